"""The DSA step's kernel forms (docs/decode.md, "Forms of the DSA step"): the MLA selection kernel's
`DecodePlan.selection_form`, the index-score kernel's `index_form` and the indexer top-k's `topk_form`, each against
the float64 reference
(contiguous and paged caches, q_len 1 and 2, ragged prompts) and against the forms before them ("base", "tile",
"radix") or the plan's on the same cache (the same selection, the same output up to the order of the rounded sums),
under the interpreter in fp16 / fp8; and which forms the plan takes.
"""

import dataclasses
import re

import pytest
import torch

import specgen
from specgen.model.spec import load_spec, replace
from specgen.runtime import decode_step
from specgen.testing import test_device
from specgen.testing.decode import check_decode
from small_specs import small_token_spec
from test_decode import fold_hist0

# V3.2 in miniature: MLA in MQA mode (8 heads on one latent head of 80 dims, the first 64 are V), fp8 index keys, a
# top-k of 160 tokens so each of a query's two splits walks two or more key tiles (the prefetch's carried units).
MLA = replace(load_spec("specs/dsa_small.yaml"), name="dsa_small_forms_mla",
              **{"heads.kv": 1, "mla": True, "head_dim.qk": 80, "head_dim.v": 64, "selection.top_k": 160,
                 "indexer.dtype": "fp8_e4m3", "indexer.head_dim": 32})
# dsa_block in miniature: MLA over 16-token blocks ranked by an indexer without fp8, 6 blocks a query.
MLA_BLOCK = replace(MLA, name="dsa_small_forms_mla_block", **{
    "selection.granularity": "block", "selection.block": 16, "selection.top_k": 6, "selection.initial": 1,
    "selection.local": 1, "indexer.dtype": "bf16"})
PROMPTS = [150, 37, 263]  # ragged: one prompt shorter than the top-k (every token selected), two longer


class Spy:
    """A kernel handle that records each launch's keyword arguments (constexprs, warps, stages)."""

    def __init__(self, kernel):
        self.kernel, self.calls = kernel, []

    def __getitem__(self, grid):
        def launch(*args, **kw):
            self.calls.append(kw)
            return self.kernel[grid](*args, **kw)
        return launch


def use_forms(monkeypatch, mod, base=None, **forms):
    """`mod`'s step and cache class on a copy of its descriptor (or `base`) with these forms, for this test only;
    its index and selection kernels are Spies."""
    d = base or mod._DECODE
    kernels = {k: Spy(v) for k, v in d.branch_kernels.items()}
    d = dataclasses.replace(d, **forms, branch_kernels=kernels, index_scores_kernel=Spy(d.index_scores_kernel),
                            index_wide_kernel=Spy(d.index_wide_kernel), topk_hist_kernel=Spy(d.topk_hist_kernel),
                            topk_write_kernel=Spy(d.topk_write_kernel))
    monkeypatch.setattr(mod, "_DECODE", d)
    monkeypatch.setattr(getattr(mod, d.cache_class), "DESCRIPTOR", d)
    return d


def launched(d):
    """(selection FORM, BLOCK_N, stages) of the last selection launch, and the index kernel that ran last."""
    sel = d.branch_kernels["selection"].calls[-1]
    wide = bool(d.index_wide_kernel.calls) and not d.index_scores_kernel.calls
    return (sel.get("FORM", 0), sel["BLOCK_N"], sel["num_stages"]), "wide" if wide else "tile"


def topk_launched(d):
    """The last step's top-k as launched: (its radix passes, K32, FOLD of the index-score launch, LIST), the form's
    TOPK_FORMS entry spelt out: four passes, or three after a folding index launch. Every launch agrees."""
    index = (d.index_wide_kernel.calls or d.index_scores_kernel.calls)[-1]
    hist = d.topk_hist_kernel.calls[-3 if index.get("FOLD") else -4:]
    flags = {(c.get("K32", False), c.get("LIST", False)) for c in hist + d.topk_write_kernel.calls[-1:]}
    assert len(flags) == 1 and all(c.get("FOLD", False) == index.get("FOLD", False) for c in hist), (flags, hist)
    k32, listed = flags.pop()
    return [c["P"] for c in hist], k32, index.get("FOLD", False), listed


TOPK_LAUNCHES = {"radix": ([0, 1, 2, 3], False, False, False), "radix32": ([0, 1, 2, 3], True, False, False),
                 "fold": ([1, 2, 3], True, True, False), "fold_list": ([1, 2, 3], True, True, True),
                 "fold_list_s64": ([1, 2, 3], True, True, True)}


@pytest.mark.parametrize("spec, selection_form, index_form, topk_form, paged, q_len", [
    (MLA, "ks_pf", "wide", "fold_list", True, 2), (MLA, "ks_pf_k32", "wide_k64", "radix32", False, 1),
    (MLA_BLOCK, "ks_pf_k32", "wide", "fold", True, 2), (MLA, "base", "tile", "fold", False, 2)],
    ids=["token_paged_q2", "token_contiguous_q1", "block_paged_q2", "token_tile_fold_q2"])
def test_forms_match_the_reference(spec, selection_form, index_form, topk_form, paged, q_len, monkeypatch):
    mod = specgen.load(spec)
    d = use_forms(monkeypatch, mod, selection_form=selection_form, index_form=index_form, topk_form=topk_form)
    check_decode(mod, spec, PROMPTS, q_len=q_len, steps=1, paged=paged, compare_prefill=False)
    sel, index = launched(d)
    assert sel[0] == decode_step.SELECTION_FORMS[selection_form][0] and index == index_form[:4]
    if selection_form != "base":
        assert sel == decode_step.SELECTION_FORMS[selection_form]
    if index_form != "tile":  # a paged cache's wide kernel keeps its key tiles' pipeline depth (PAGED_INDEX_STAGES)
        stages = decode_step.INDEX_FORMS[index_form][1] + (decode_step.PAGED_INDEX_STAGES if paged else 0)
        assert {c["num_stages"] for c in d.index_wide_kernel.calls} == {stages}
    assert topk_launched(d) == TOPK_LAUNCHES[topk_form]


def _step_inputs(mod, spec, B, QL, T, gen, dev, ties=False):
    """A paged cache of B ragged sequences and a step's inputs. `ties`: integer index keys and queries that give
    each row a handful of distinct scores (every index key is (1, a, b, 0, ...), a and b in {0, 1}: exact in e4m3
    with equal per-token scales), so the top-k's threshold falls inside long runs of ties."""
    Cache = getattr(mod, mod._DECODE.cache_class)
    table = torch.randperm(B * (-(-T // spec.decode.page_size)), generator=gen).to(torch.int32).view(B, -1)
    cache = Cache(B, num_pages=table.numel(), block_table=table.to(dev), device=dev)
    hkv = spec.heads.kv
    lens = torch.tensor([T - 41, T - QL - 90, T - QL], dtype=torch.int32)[:B]

    def rnd(n, w, name=None):
        if ties and name == "k_idx":
            x = torch.zeros(B, n, hkv, w)
            x[..., 0] = 1.0
            x[..., 1:3] = torch.randint(0, 2, (B, n, hkv, 2), generator=gen).float()
            return x.to(dev, mod.DTYPE)
        return torch.randn(B, n, hkv, w, generator=gen).to(dev, mod.DTYPE)
    cache.prefill(seqlens=lens, **{n: rnd(T - QL, w, n) for n, w in mod.CACHE_TENSORS.items()})
    cache.append(**{n: rnd(QL, w, n) for n, w in mod.CACHE_TENSORS.items()})
    hi = hkv * spec.indexer.heads
    kw = {"q_idx": torch.randn(B, QL, hi, spec.indexer.head_dim, generator=gen).to(dev, mod.DTYPE),
          "w_idx": torch.randn(B, QL, hi, generator=gen).to(dev, mod.DTYPE)}
    if ties:
        kw = {"q_idx": torch.randint(0, 3, (B, QL, hi, spec.indexer.head_dim), generator=gen).to(dev, mod.DTYPE),
              "w_idx": torch.ones(B, QL, hi).to(dev, mod.DTYPE)}
    q = (torch.randn(B, QL, spec.heads.q, spec.head_dim.qk, generator=gen) * 2).to(dev, mod.DTYPE)
    return cache, q, kw


BEFORE = dict(selection_form="base", index_form="tile")  # the forms before the others: every spec's but MLA + indexer


@pytest.mark.parametrize("spec, plan_forms, forms", [
    # the plan's own forms (MLA ranked by an indexer: the measured faster ones), and others beside them
    (MLA, ("ks_pf_k32", "wide_w8"), [dict(selection_form="ks_pf_k32", index_form="wide_w8"),
                                     dict(selection_form="ks_pf_s2", index_form="wide_w8"),
                                     dict(selection_form="ks_pf_k32", index_form="tile")]),
    # block granularity ranked by an indexer (16-token units, a wide tile of 128 keys holds 8), GQA: index forms only
    (small_token_spec("nsa_token_forms_block", **{"selection.granularity": "block", "selection.block": 16,
                                                  "selection.top_k": 3, "selection.initial": 1,
                                                  "selection.local": 1}), ("base", "tile"),
     [dict(index_form="wide_k64")]),
])
def test_forms_select_alike_and_agree_with_the_forms_before(spec, plan_forms, forms, monkeypatch):
    """On one paged cache (ragged lengths, q_len 3, several key tiles and two chunks per program's sequence): every
    form, the plan's included, picks the same units as the forms before them ("base" / "tile": the index scores are
    summed in the same order over the heads, so bit for bit) and its output agrees to rounding (S's parts are summed
    in another order)."""
    mod = specgen.load(spec)
    gen = torch.Generator().manual_seed(5)
    dev = test_device()
    cache, q, kw = _step_inputs(mod, spec, 3, 3, 330, gen, dev)
    if spec.gated:
        kw["gates"] = torch.rand(3, 3, spec.heads.q, len(spec.branches), generator=gen).to(dev, mod.DTYPE)
    decode = getattr(mod, f"{spec.family}_decode")
    plan = mod._DECODE
    assert (plan.selection_form, plan.index_form, plan.topk_form) == (*plan_forms, "radix")
    d = use_forms(monkeypatch, mod, plan, **BEFORE)
    want, want_idx = decode(q, cache, **kw, num_splits=2, return_indices=True)
    assert launched(d)[1] == "tile" and launched(d)[0][0] == 0
    assert (want_idx >= 0).sum() >= 3 * 3 * spec.heads.kv * min(spec.selection.top_k, 160)
    for f in forms:
        d = use_forms(monkeypatch, mod, plan, **{**BEFORE, **f})
        got, idx = decode(q, cache, **kw, num_splits=2, return_indices=True)
        assert launched(d)[1] == f.get("index_form", "tile")[:4]
        if spec.mla:
            assert launched(d)[0] == decode_step.SELECTION_FORMS[f["selection_form"]]
        assert torch.equal(idx, want_idx), f
        err = ((got.double() - want.double()).norm() / want.double().norm()).item()
        assert err < 2e-3, (f, err)


@pytest.mark.parametrize("spec, forms", [
    (MLA, [dict(index_form="wide", topk_form="fold"), dict(index_form="tile", topk_form="fold"),
           dict(index_form="wide", topk_form="fold_list")]),
    (MLA_BLOCK, [dict(index_form="wide_k64", topk_form="fold"), dict(index_form="tile", topk_form="fold_list")])],
    ids=["token", "block"])
def test_topk_forms_select_as_the_plan_form_on_tied_scores(spec, forms, monkeypatch):
    """On one paged cache (ragged, q_len 3, several segments a row) whose index scores take a handful of values
    (long runs of exact ties at the threshold: the lower index wins): every top-k form picks exactly the units of
    the plan's top-k ("radix", checked against the reference's rule in tests/test_decode.py) on the same index
    form's workspace, so the step's output is the same bits; under the interpreter also exactly the plan's step's
    (its own index form: every index form's scores are the same bits there); the fold form's first pass, made by
    the index-score kernel (tile and wide, token and block units), is the histogram of the workspace's competing
    keys, bin for bin."""
    mod = specgen.load(spec)
    gen = torch.Generator().manual_seed(7)
    dev = test_device()
    B, QL = 3, 3
    cache, q, kw = _step_inputs(mod, spec, B, QL, 330, gen, dev, ties=True)
    decode = getattr(mod, f"{spec.family}_decode")
    plan = mod._DECODE
    assert plan.topk_form == "radix"
    seen, real = {}, mod._decode_topk

    def spy(ws, seqlens, indices, segment=None, hist0=None, chain=None):
        seen.update(ws=ws.cpu(), seqlens=seqlens.cpu(), hist0=hist0)
        return real(ws, seqlens, indices, segment=8 * 16 // spec.selection.block, hist0=hist0,  # 3+ segments a row
                    chain=chain)

    monkeypatch.setattr(mod, "_decode_topk", spy)
    want, want_idx = decode(q, cache, **kw, num_splits=2, return_indices=True)
    ws = seen["ws"]
    row = ws[2, 0, -1, :int(seen["seqlens"][2]) // spec.selection.block]
    # Tokens: four distinct scores a row; blocks (log-sum-exps of 16 of them): still some ties.
    assert len(row.unique()) * (8 if spec.selection.granularity == "token" else 1) < len(row), "too few ties"
    # The reference of each entry: the step with its index form and the plan's top-k ("radix"). Compiled for a GPU
    # the index forms need not give the same bits (their dots add in other orders, Hopper's fp8 MMA does not
    # accumulate in exact fp32, the compiler fuses multiply-adds per tile), so scores tied on one index form's
    # workspace need not be tied on another's (the H100 picked other units with wide + fold than the plan's
    # wide_w8 + radix): a top-k form is compared with "radix" on its own index form's workspace. The interpreter
    # gives every index form the same scores: there each entry is also the plan's step, bit for bit. The plan's
    # step is the reference of its own index form.
    radix = {plan.index_form: (want, want_idx)}
    for f in forms:
        if f["index_form"] not in radix:
            d = use_forms(monkeypatch, mod, plan, index_form=f["index_form"])
            radix[f["index_form"]] = decode(q, cache, **kw, num_splits=2, return_indices=True)
            assert topk_launched(d) == TOPK_LAUNCHES["radix"], f
        d = use_forms(monkeypatch, mod, plan, **f)
        got, idx = decode(q, cache, **kw, num_splits=2, return_indices=True)
        assert topk_launched(d) == TOPK_LAUNCHES[f["topk_form"]], f
        if f["topk_form"].startswith("fold"):  # from this step's workspace (the units no query selects are unwritten)
            assert torch.equal(seen["hist0"].cpu(), fold_hist0(mod, seen["ws"], seen["seqlens"])), f
            assert seen["hist0"].sum() > 0
        ref, ref_idx = radix[f["index_form"]]
        assert torch.equal(idx, ref_idx), f
        assert torch.equal(got, ref), f
        if dev == "cpu":
            assert torch.equal(idx, want_idx), f
            assert torch.equal(got, want), f


# Compiled (not interpreted) for sm_90 up to Triton's TTIR, where its combine pass has run: no GPU needed. Prints,
# for every masked tl.histogram of each kernel, its input's and its mask's defining ops.
_HISTOGRAM_OPERANDS = r"""
import json, os, re, sys
os.environ["TRITON_INTERPRET"] = "0"
sys.path.insert(0, sys.argv[1])
from triton._C.libtriton import ir
from triton.backends.compiler import GPUTarget
from triton.compiler.compiler import ASTSource, make_backend
import specgen
from test_decode_forms import MLA, MLA_BLOCK

target = GPUTarget("cuda", 90, 32)
backend = make_backend(target)
out = {}
for spec in (MLA, MLA_BLOCK):
    mod = specgen.load(spec)
    for name, bs in (("_decode_index_scores_kernel", mod._DECODE.index_bs), ("_decode_index_wide_kernel", 128)):
        fn = getattr(mod, name)
        consts = dict(PAGED=1, QLP=8 if mod._DECODE.index_hp == 2 else 4, BS=bs, WIDEN=0, FOLD=1)
        sig = {}
        for p in fn.arg_names:
            if p in consts:
                sig[p] = "constexpr"
            elif p in ("QI", "KI"):
                sig[p] = "*fp8e4nv" if mod._DECODE.fp8 else "*fp16"
            elif p in ("WI", "WS", "KS"):
                sig[p] = "*fp32" if p != "WI" or mod._DECODE.fp8 else "*fp16"
            elif p.isupper() and p not in ("QL", "TCAP", "WS_ROW", "CHUNK"):
                sig[p] = "*i32"
            else:
                sig[p] = "fp32" if p == "idx_scale" else "i32"
        src = ASTSource(fn, sig, constexprs=consts)
        options = backend.parse_options({"num_warps": 4, "num_stages": 1})
        context = ir.context()
        ir.load_dialects(context)
        backend.load_dialects(context)
        module = src.make_ir(target, options, backend.get_codegen_implementation(options), backend.get_module_map(),
                             context)
        stages = {}
        backend.add_stages(stages, options, src.language)
        text = str(stages["ttir"](module, {}))
        defs = {m.group(1): m.group(2) for m in re.finditer(r"^\s*(%[\w.]+) = ([^\n]*)$", text, re.M)}
        hists = re.findall(r"tt\.histogram (%[\w.]+), (%[\w.]+)", text)
        out[f"{spec.name}.{name}"] = [(a, defs[a], b, defs[b]) for a, b in hists]
print(json.dumps(out))
"""


def test_fold_histogram_mask_lines_up_with_its_bins():
    """The fold's `tl.histogram` over a flattened [queries x keys] tile takes its mask from the flattened bins
    themselves. On the GPU, Triton's combine pass lets a rank-1 reshape that feeds only histograms reorder its
    elements: bins and mask flattened by two reshapes from different layouts were each reordered their own way, so
    the mask no longer matched the bins (the fold's counts went to other entries' bins, or to padded queries' bins
    that are dropped; the top-k then took other units than the plan's on tied scores on an H200). The interpreter
    never reorders, so this looks at the compiled form (sm_90 TTIR: the combine pass, no GPU): every masked histogram's
    mask is computed from the histogram's input, not reshaped on its own."""
    import json
    import os
    import subprocess
    import sys

    pytest.importorskip("triton.backends.nvidia")
    here = os.path.dirname(os.path.abspath(__file__))
    env = dict(os.environ, TRITON_INTERPRET="0")
    run = subprocess.run([sys.executable, "-c", _HISTOGRAM_OPERANDS, here], capture_output=True, text=True, env=env,
                         timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    found = json.loads(run.stdout.strip().splitlines()[-1])
    assert len(found) == 4 and all(len(h) == 1 for h in found.values()), found
    for kernel, hists in found.items():
        for x, x_def, mask, mask_def in hists:
            assert not mask_def.startswith("tt.reshape") and re.search(re.escape(x) + r"\b", mask_def), (
                kernel, x_def, mask_def)


def test_plan_takes_the_measured_forms_where_they_apply():
    """The MLA step ranked by an indexer takes ks_pf_k32 + wide_w8 (+ radix), each where check_forms allows it;
    every other spec keeps base + tile + radix."""
    from pathlib import Path

    from specgen.compile import plan as plans
    from specgen.compile.plan import make_plan

    assert decode_step.SELECTION_FORMS[plans.MLA_SELECTION_FORM][1] == plans.MLA_SELECTION_TILE
    root = Path(__file__).resolve().parent.parent / "specs"
    specs = [load_spec(p) for p in sorted(root.glob("*.yaml")) + sorted(root.glob("models/*.yaml"))
             if not p.name.endswith(".sweep.yaml")]
    want = {"dsa_v32": ("ks_pf_k32", "wide_w8")}  # token granularity only: dsa_block keeps base / tile until timed
    specs += [MLA, MLA_BLOCK, replace(MLA, name="mla_64_64", **{"head_dim.qk": 64}),
              replace(MLA_BLOCK, name="mla_block64", **{"selection.block": 64})]
    want.update({MLA.name: ("ks_pf_k32", "wide_w8"), "mla_64_64": ("base", "wide_w8")})  # block units: base / tile
    assert {s.name for s in specs} >= set(want)
    for spec in specs:
        d = make_plan(spec).decode
        forms = (d.selection_form, d.index_form, d.topk_form)
        assert forms == (*want.get(spec.name, ("base", "tile")), "radix"), spec.name
        if spec.name in want:  # the descriptor's checks agree (a form that did not apply would raise here)
            desc = specgen.load(spec)._DECODE
            assert (desc.selection_form, desc.index_form) == want[spec.name]
            decode_step.check_forms(desc)


def test_forms_are_checked():
    mod = specgen.load(load_spec("specs/dsa_small.yaml"))
    d = mod._DECODE
    decode_step.check_forms(d)
    with pytest.raises(ValueError, match="needs MLA"):
        decode_step.check_forms(dataclasses.replace(d, selection_form="ks_pf"))
    with pytest.raises(ValueError, match="unknown index form"):
        decode_step.check_forms(dataclasses.replace(d, index_form="nope"))
    with pytest.raises(ValueError, match="unknown top-k form"):
        decode_step.check_forms(dataclasses.replace(d, topk_form="nope"))
    with pytest.raises(ValueError, match="unknown launch form"):
        decode_step.check_forms(dataclasses.replace(d, form="nope"))
    with pytest.raises(ValueError, match="form 'fused': .* no compression-scored selection"):
        decode_step.check_forms(dataclasses.replace(d, form="fused"))
    with pytest.raises(ValueError, match="unknown top-k form"):  # a step checks its descriptor before anything else
        decode_step.step(dataclasses.replace(d, topk_form="nope"), None, None)
    with pytest.raises(ValueError, match="top-k form 'fold' needs an indexer"):
        decode_step.check_forms(dataclasses.replace(d, indexer=False, topk_form="fold"))
    with pytest.raises(ValueError, match="not whole units of 64"):
        decode_step.check_forms(dataclasses.replace(d, mla=True, dqk=80, dv=64, sel_block=64, selection_form="ks_pf_k32"))
    # FORM 1 takes V from the key tile's first part and masks S through the rope part's product: a single-part key
    # (64/64: S unmasked, wrong output) or a first part wider than V (96/32: P @ K0 of the wrong width) is refused.
    mla = dataclasses.replace(d, mla=True)
    decode_step.check_forms(dataclasses.replace(mla, dqk=80, dv=64, selection_form="ks_pf"))
    for dqk, dv in ((64, 64), (96, 32), (128, 64)):
        with pytest.raises(ValueError, match="needs head_dim.qk split as head_dim.v plus a rope part"):
            decode_step.check_forms(dataclasses.replace(mla, dqk=dqk, dv=dv, selection_form="ks_pf"))


def test_bench_decode_forms_swap_the_descriptor_and_restore_it():
    """`specgen bench --decode --decode-forms`: inside the block the step and the cache class see the named forms,
    the plan's after it (also after an error)."""
    from specgen.perf.bench_decode import decode_forms, parse_forms

    mod = specgen.load(MLA)
    plan = mod._DECODE
    assert parse_forms("ks_pf+wide") == {"selection_form": "ks_pf", "index_form": "wide"}
    assert parse_forms("ks_pf_k32+wide+fold") == {"selection_form": "ks_pf_k32", "index_form": "wide",
                                                  "topk_form": "fold"}
    assert parse_forms("plan") == {}
    # a cap on the key-range splits (the descriptor's max_splits; the GPU's split rule reads it)
    assert parse_forms("ks_pf+ms8") == {"selection_form": "ks_pf", "max_splits": 8}
    for bad in ("ks_pf+nope", "ms0", "ms", "ms08x"):
        with pytest.raises(ValueError, match="unknown"):
            parse_forms(bad)
    with pytest.raises(ValueError, match="two split caps"):
        parse_forms("ms8+ms16")
    with decode_forms(mod, "ms8") as d:
        assert d.max_splits == 8 and mod._DECODE is d
    # the epilogue's splits a load (the descriptor's combine_sb), checked as a power of two up to 64
    assert parse_forms("cs32+ms8") == {"combine_sb": 32, "max_splits": 8}
    with pytest.raises(ValueError, match="two epilogue loads"):
        parse_forms("cs8+cs16")
    with pytest.raises(ValueError, match="combine_sb 24 .* power of two from 1 to 64"):
        with decode_forms(mod, "cs24"):
            pass
    for twice in ("split+fused", "ks_pf+ks_pf_k32", "wide+tile", "fold+radix32"):  # the last is not silently taken
        with pytest.raises(ValueError, match="at most one of each kind"):
            parse_forms(twice)
    with decode_forms(mod, "plan") as d:
        assert d is plan
    with pytest.raises(RuntimeError):
        with decode_forms(mod, "ks_pf+wide") as d:
            assert (d.selection_form, d.index_form) == ("ks_pf", "wide")
            assert mod._DECODE is d and mod.DSACache.DESCRIPTOR is d
            raise RuntimeError
    assert mod._DECODE is plan and mod.DSACache.DESCRIPTOR is plan


def test_bench_decode_forms_checked_per_spec():
    """`specgen bench --decode --decode-forms` checks every entry against every spec's step before any GPU work:
    a form that exists but does not apply to the spec is refused naming the entry and the spec."""
    from specgen.perf.bench_decode import check_decode_forms

    mla, gqa = specgen.load(MLA), specgen.load(load_spec("specs/dsa_small.yaml"))
    check_decode_forms(mla, ["plan", "ks_pf+wide+fold_list", "split"])
    check_decode_forms(gqa, ["wide+fold"])
    plans = {gqa: gqa._DECODE, mla: mla._DECODE}
    for mod, name, why in ((gqa, "ks_pf", "needs MLA"), (mla, "fused", "fused"), (mla, "wide+fused", "fused")):
        with pytest.raises(ValueError, match=re.escape(f"--decode-forms '{name}' on ") + f".*{why}"):
            check_decode_forms(mod, ["plan", name])
        assert mod._DECODE is plans[mod] and mod._DECODE.form == "split"


gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (realistic sizes)")
V32 = "specs/dsa_v32.yaml"


@gpu
@pytest.mark.gpu
@pytest.mark.parametrize("selection_form, index_form, topk_form, layout, q_len", [
    ("ks_pf", "wide", "radix", "paged", 4), ("ks_pf_s2", "wide_w8", "radix", "paged", 4),
    ("ks_pf_k32", "wide_k64", "radix", "paged", 4), ("ks_pf_k32", "wide", "radix", "contiguous", 1),
    ("ks_pf", "wide", "fold_list", "paged", 4), ("ks_pf_k32", "wide", "fold_list", "contiguous", 1),
    ("base", "tile", "fold", "paged", 4), ("ks_pf_k32", "wide_k64", "radix32", "contiguous", 1),
    ("ks_pf_k32", "wide", "fold_list_s64", "contiguous", 1)],
    ids=lambda x: str(x))
def test_v32_forms_realistic(selection_form, index_form, topk_form, layout, q_len, monkeypatch):
    """dsa_v32 itself (bf16, fp8 index keys, 128 heads on one latent head) near 64k of context in every form, against
    the float64 reference, as generated/test_dsa_v32.py's test_decode_realistic checks the plan's forms."""
    from specgen.compile.test_shapes import decode_gpu_prompts

    spec = load_spec(V32)
    mod = specgen.load(spec)
    d = use_forms(monkeypatch, mod, selection_form=selection_form, index_form=index_form, topk_form=topk_form)
    check_decode(mod, spec, decode_gpu_prompts(spec), q_len=q_len, steps=1, paged=layout == "paged", device="cuda",
                 query_chunk=128, compare_prefill=False)
    sel, index = launched(d)
    assert sel[0] == decode_step.SELECTION_FORMS[selection_form][0] and index == index_form[:4]
    assert topk_launched(d) == TOPK_LAUNCHES[topk_form]


@gpu
@pytest.mark.gpu
@pytest.mark.parametrize("topk_form", ["radix", "fold_list"])
def test_v32_forms_cuda_graph(topk_form, monkeypatch):
    """A replayed CUDA graph of a step in the new forms equals the eager step bit for bit (also after an append; the
    fold's histogram buffer is zeroed inside the graph at each replay)."""
    from specgen.compile.test_shapes import decode_gpu_prompts
    from specgen.testing.decode import check_decode_cuda_graph

    spec = load_spec(V32)
    mod = specgen.load(spec)
    use_forms(monkeypatch, mod, selection_form="ks_pf_k32", index_form="wide", topk_form=topk_form)
    check_decode_cuda_graph(mod, spec, decode_gpu_prompts(spec))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (realistic sizes)")
def test_launch_chain_pdl_on_the_dsa_step(monkeypatch):
    """dsa_v32 at 64k (paged, fp8 index keys, batch 2, q_len 1): the chain "pdl" over the index, top-k, selection and
    combine kernels gives the plain chain's bits, eagerly and replayed from a CUDA graph three times."""
    from test_decode import replays_equal

    spec = load_spec("specs/dsa_v32.yaml")
    mod = specgen.load(spec)
    cache, q, kw = _step_inputs(mod, spec, 2, 1, 65536, torch.Generator().manual_seed(3), "cuda")
    out = torch.full((2, 1, spec.heads.q, spec.head_dim.v), float("nan"), dtype=mod.DTYPE, device="cuda")
    got = {}
    for chain in ("plain", "pdl"):
        use_forms(monkeypatch, mod, base=dataclasses.replace(mod._DECODE, chain=chain))

        def step():
            return mod.dsa_decode(q, cache, **kw, out=out, return_lse=True, return_indices=True)
        got[chain] = [x.clone() for x in step()]
    for x, y in zip(got["pdl"], got["plain"]):
        assert torch.equal(x, y), "the pdl chain changed a value"
    assert d_launched_pdl(mod._DECODE)
    replays_equal(step, got["plain"], cache, "dsa pdl")


def d_launched_pdl(d) -> bool:
    """Every chain-aware launch of the last steps carried PDL=1 (the spies of `use_forms`)."""
    calls = d.index_wide_kernel.calls + d.index_scores_kernel.calls + d.topk_write_kernel.calls
    return bool(calls) and all(c.get("PDL") == 1 for c in calls)
