"""The block-scoring kernel (`_select_blocks_kernel`: group scores + top-n) under plan variants, timed alone
inside the forward on the GPU, with the compiler's registers/spills, and checked to select exactly what the plan's
default selects (the forward's output must be bit-identical).

Usage (GPU): python bench/select_variants.py specs/models/*.yaml --seqlens 65536 --json out.jsonl [--variants ...]
(specs first: --variants takes every word after it)
A variant is MODE:BT:WARPS:BJ[:OVERLAP] (MODE merge, the running top-n the kernel has, or the probe merge-nomerge;
BT query positions per program; warps; selection blocks per loop trip; sums|dot: how block scores are formed). The
probe (timing only, its selection is wrong by design) replaces each trip's top-n merge by an elementwise max, to
say where the kernel's time goes. The records of 2026-12-06 (bench/results/scoring) also have a "registers" mode
(every block score of a row kept, n rounds of argmax) that the plan has since dropped. The plan's own choice
runs first as the baseline. An experiment tool: the winning rule goes into compile/plan.py and tuning.py.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

import torch

import specgen.compile.plan as plan_mod
import specgen.compile.render as render_mod
from specgen import reference
from specgen.compile.jit import import_path, load
from specgen.model.spec import load_spec, replace
from specgen.perf.bench import compiler_report, kernel_times

KERNEL = "_select_blocks_kernel"


def patched(variant):
    """make_plan / default_configs returning the variant's scoring tiles (None: the plan's own)."""
    make, defaults = plan_mod.make_plan, plan_mod.default_configs
    if variant is None:
        return make, defaults
    _, bt, warps, bj, *overlap = variant

    def make_plan(spec):
        p = make(spec)
        r = p.score_bnc // p.score_bj  # compression blocks per selection block
        return dataclasses.replace(p, score_bt=bt, score_bj=bj, score_bnc=bj * r,
                                   score_overlap=overlap[0] if overlap else p.score_overlap)

    def default_configs(p):
        c = defaults(p)
        c["select"] = {"num_warps": warps}
        return c
    return make_plan, default_configs


# Probe -> (old line, new line) alternatives: the first whose old line the kernel has is applied.
PROBES = {
    "nomerge": [
        ("        best = tl.bitonic_merge(tl.maximum(best, tl.sort(key, dim=1)), dim=1, descending=True)",
         "        best = tl.maximum(best, key)"),
        ("        best = tl.topk(tl.reshape(tl.join(best, key), (best.shape[0], 2 * TOP_K_PAD)), TOP_K_PAD, dim=1)",
         "        best = tl.maximum(best, key)"),
    ],
}


def probe(module, name: str):
    """The module with its scoring kernel's source edited by PROBES[name], imported under a new name."""
    src = Path(module.__file__).read_text()
    edit = next(((old, new) for old, new in PROBES[name] if old in src), None)
    assert edit is not None, f"probe {name}: the kernel has none of the lines it edits"
    path = Path(module.__file__).with_name(f"{Path(module.__file__).stem}_probe_{name}.py")
    path.write_text(src.replace(*edit))
    return import_path(path, path.stem)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("specs", nargs="+")
    ap.add_argument("--seqlens", type=int, nargs="+", default=[32768, 65536])
    ap.add_argument("--variants", nargs="+", default=["merge:16:4:16", "merge:32:4:16", "merge:64:4:16",
                                                      "merge:16:8:16", "merge-nomerge:16:4:16"])
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    make0, defaults0 = plan_mod.make_plan, plan_mod.default_configs
    out = open(args.json, "a") if args.json else None
    for path in args.specs:
        base = load_spec(path)
        p0 = make0(base)
        own = ("merge", p0.score_bt, defaults0(p0)["select"]["num_warps"], p0.score_bj)
        variants = [None] + [v for v in (tuple(int(x) if x.isdigit() else x for x in s.split(":"))
                                         for s in args.variants) if v != own]
        ref_out = {}
        for variant in variants:
            tag = "plan" if variant is None else "_".join(map(str, variant))
            spec = replace(base, name=f"{base.name}_sel_{tag}")
            make, defaults = patched(variant)
            render_mod.make_plan, plan_mod.default_configs = make, defaults
            try:
                module = load(spec)
            except Exception as exc:  # noqa: BLE001 (a variant the compiler rejects is reported)
                print(f"{base.name} {tag}: build failed: {str(exc).splitlines()[0][:120]}", flush=True)
                continue
            finally:
                render_mod.make_plan, plan_mod.default_configs = make0, defaults0
            if variant is not None and "-" in variant[0]:
                module = probe(module, variant[0].split("-")[1])
            fwd = getattr(module, f"{spec.family}_forward")
            for T in args.seqlens:
                gen = torch.Generator(device="cuda").manual_seed(T)
                x = reference.make_inputs(spec, 1, T, dtype=module.DTYPE, device="cuda", generator=gen)
                try:
                    o = fwd(**x)
                    ms = kernel_times(lambda: fwd(**x), calls=5, names=[KERNEL]).get(KERNEL)
                except Exception as exc:  # noqa: BLE001
                    print(f"{base.name} {tag} T={T}: failed: {str(exc).splitlines()[0][:120]}", flush=True)
                    continue
                same = None
                if variant is None:
                    ref_out[T] = o.clone()
                elif T in ref_out:
                    same = bool(torch.equal(o, ref_out[T]))
                comp = compiler_report(module).get(KERNEL, [{}])[0]
                row = {"spec": base.name, "variant": tag, "mode": variant[0] if variant else own[0],
                       "bt": (variant or own)[1], "num_warps": (variant or own)[2], "bj": (variant or own)[3],
                       "T": T, "select_ms": ms, "same_output_as_plan": same,
                       "registers": comp.get("registers"), "spills": comp.get("spills"),
                       "device": torch.cuda.get_device_name()}
                print(json.dumps(row), flush=True)
                if out:
                    out.write(json.dumps(row) + "\n")
                    out.flush()
                del x, o
                torch.cuda.empty_cache()
    return 0


if __name__ == "__main__":
    sys.exit(main())
