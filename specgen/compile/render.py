"""Rendering: spec -> plan -> Jinja templates -> the generated module and its test.

Rendering is a pure function of the spec (and the specgen version): same spec, same bytes. Files are written
atomically (a temporary file renamed over the target) and only when their bytes change, so a build never leaves a
half-written module and an unchanged spec touches nothing.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from .. import RUNTIME_SCHEMA
from .files import build_error as _build_error, write_files, write_if_changed  # noqa: F401 (re-exported)
from .branches import BRANCHES
from .loop_order import scatter_backward
from .plan import Plan, make_plan
from .records import load_records, records_hash
from .render_distill import DistillPlan, distill_context
from ..model.signature import signature
from ..model.spec import Spec, validated
from .test_shapes import (cpu_seqlens, decode_cases, decode_gpu_prompts, decode_prompts, gpu_seqlens,
                           gpu_varlen_backward_seqlens, gpu_varlen_seqlens, varlen_seqlens)
from .templating import TEMPLATES, environment as _environment, header, pack, pyliteral, pystr, pytext  # noqa: F401 (re-exported)

TORCH_DTYPES = {"bf16": "torch.bfloat16", "fp16": "torch.float16", "fp32": "torch.float32"}
# Each branch's own k/v inputs under `kv: independent` (k_cmp, v_cmp, ...), and the launch order: the registry's.
SHORT = {b.name: b.short for b in BRANCHES}
LAUNCH_ORDER = tuple(b.name for b in BRANCHES)


@dataclass(frozen=True)
class Argument:
    name: str
    shape: str       # a Python tuple literal; str entries are symbols bound across arguments
    dtype: str       # "DTYPE" (the spec's) or "None"
    doc: str
    keyword: bool = False
    why: str = ""


def arguments(spec: Spec) -> list[Argument]:
    """The call contract (specgen.model.signature) as the templates print it: shapes as tuple literals."""
    def literal(shape):
        return "(" + ", ".join(f'"{d}"' if isinstance(d, str) else str(d) for d in shape) + ("," if len(shape) == 1 else "") + ")"
    return [Argument(a.name, literal(a.shape), "DTYPE" if a.spec_dtype else "None", a.doc, a.keyword, a.why)
            for a in signature(spec)]


def _sorted(value):
    """Dicts with their keys sorted, all the way down (launch configs print in one order whatever built them)."""
    return {k: _sorted(value[k]) for k in sorted(value)} if isinstance(value, dict) else value


def candidate_table(candidates: dict) -> dict:
    """{kernel: (field names, row, ...)}: the candidate configs as `runtime.launches.config_table` reads them back;
    a kernel whose candidates equal an earlier kernel's (the window's and the compression's, often) names it."""
    out: dict = {}
    for kernel, configs in candidates.items():
        same = next((k for k in out if candidates[k] == configs), None)
        if same is not None:
            out[kernel] = same
            continue
        names = tuple(sorted(configs[0]))
        if any(tuple(sorted(c)) != names for c in configs):
            raise AssertionError(f"candidates of {kernel} differ in their fields")
        # Fields every candidate shares print once, not in every row.
        fixed = {f: configs[0][f] for f in names if len(configs) > 1 and all(c[f] == configs[0][f] for c in configs)}
        fields = tuple(f for f in names if f not in fixed)
        out[kernel] = (fields, *((fixed,) if fixed else ()), *(tuple(c[f] for f in fields) for c in configs))
    return out


def _descriptor_args(args: list[Argument]) -> str:
    """The descriptor's `args` entries, several to a line."""
    return pack([f"runtime.descriptor.Arg({pystr(a.name)}, {a.shape}"
                 + (f", keyword=True, why={pystr(a.why)}" if a.keyword else "")
                 + (", checks_dtype=False" if a.dtype == "None" else "") + ")," for a in args],
                start=len("    args=("), indent=8)


def _kv_names(spec: Spec) -> dict[str, str]:
    names = {}
    for branch, s in SHORT.items():
        if spec.kv == "shared":
            names[f"k_{s}"], names[f"v_{s}"] = "k", "v"
        else:
            names[f"k_{s}"], names[f"v_{s}"] = f"k_{s}", f"v_{s}"
    return names


def module_context(spec: Spec, plan: Plan | None = None, records: list | None = None) -> dict:
    """The template variables of a module: the spec, its plan (every tile and config decision) and names; the
    values here are formatted plan and spec values, not decisions."""
    from .tuning import configs_for

    plan = plan or make_plan(spec)
    records = records or []
    args = arguments(spec)
    return {
        "spec": spec,
        "plan": plan,
        "runtime_schema": RUNTIME_SCHEMA,
        "header": header(spec, "the kernels") + f"\n# Tuning record: {records_hash(records)}.",
        "records_hash": records_hash(records),
        "configs": pyliteral(_sorted(configs_for(plan, records)), start=len("CONFIGS = ")),
        "candidates": pyliteral(candidate_table(plan.tuning.candidates),
                                start=len("CANDIDATES = runtime.launches.config_table(")),
        "spec_hash": spec.hash,
        "spec_dict": pyliteral(spec.written(), start=len("SPEC = ")),
        "descriptor_args": _descriptor_args(args),
        "torch_dtype": TORCH_DTYPES[spec.dtype],
        "launch_order": [b.name for b in plan.branches],
        "fn_name": f"{spec.family}_forward",
        "positional": [a.name for a in args if not a.keyword],
        "keyword_inputs": [a for a in args if a.keyword],
        "arguments": args,
        "arg_names": [a.name for a in args],
        "nondiff_names": [a.name for a in signature(spec) if not a.differentiable],
        # The arguments of a call that passes them on as the function takes them (positional, then keywords).
        "call_args": "".join(f"{a.name}, " for a in args if not a.keyword)
        + "".join(f"{a.name}={a.name}, " for a in args if a.keyword),
        # Inputs with one row per token (padded in a packed call); pool weights are shared by the sequences.
        "token_args": [a.name for a in args if '"T"' in a.shape],
        "kv": _kv_names(spec),
        "short": SHORT,
        "idx_scale": repr(plan.idx_scale),
        "bwd": plan.backward,
        "dec": decode_context(spec, args, plan),
        # The forward runs packed batches on the packed rows (docs/varlen.md); else it pads them.
        "native_varlen": True,
    }


def decode_context(spec: Spec, args: list[Argument], plan: Plan) -> dict:
    """Names and descriptor literals of the decode API (specgen.runtime.decode_descriptor): the cache stores every
    per-token key/value/index-key input; tiles and the ring are the plan's (`plan.decode`)."""
    dims = {"k": spec.head_dim.qk, "v": spec.head_dim.v}
    stored = {}
    for a in args:
        if a.name in ("k", "v") or a.name[:2] in ("k_", "v_") and a.name != "k_idx":
            stored[a.name] = dims[a.name[0]]
    if spec.indexer is not None:
        stored["k_idx"] = spec.indexer.head_dim
    ring = plan.decode.ring
    missing = [n for n in ring if n not in stored]
    if missing:
        raise AssertionError(f"decode ring tensors {missing} are not inputs of spec {spec.name}")
    kv = _kv_names(spec)
    cmp_, sel = spec.compression, spec.selection
    # The linear pooling's weights as the cache checks them: (name, shape, dtype) in argument order.
    pool_weights = [f"({pystr(a.name)}, {a.shape}, {a.dtype})" for a in args
                    if a.name in ("w_pool_k", "w_pool_v", "pe_pool_k", "pe_pool_v")]
    return {"cache_class": f"{spec.family.upper()}Cache", "fn": f"{spec.family}_decode", "stored": repr(stored),
            "stored_names": list(stored),
            # kv: independent gives the compression branch its own k/v, read only to pool newly completed blocks
            # (plan.decode_ring): a tuple, tested as such by the templates; its repr is what the module prints.
            "ring": ring, "ring_repr": repr(ring), "ring_size": plan.decode.ring_size,
            # Descriptor literals of the parts a spec may lack (0 / False / None without them).
            "compressed": spec.needs_compressed_kv, "cmp_branch": "compression" in spec.branches,
            "cmp_block": cmp_.block if cmp_ else 0, "cmp_stride": cmp_.stride if cmp_ else 0,
            "position_embedding": bool(cmp_ and cmp_.position_embedding),
            "sel_block": sel.block if sel else 0, "top_k": sel.top_k if sel else 0,
            "indexer": spec.indexer is not None, "idx_heads": spec.indexer.heads if spec.indexer else 0,
            "idx_dim": spec.indexer.head_dim if spec.indexer else 0, "window": spec.window.size if spec.window else 0,
            "max_gp": plan.decode.max_gp, "num_stages": plan.decode.num_stages,
            "fp8": spec.indexer is not None and spec.indexer.dtype == "fp8_e4m3",
            "scorer": repr(sel.scorer if sel else None),
            "pool_kind": repr(cmp_.pool if cmp_ else None),
            "pool_weights": "(" + ", ".join(pool_weights) + ("," if len(pool_weights) == 1 else "") + ")",
            "k_cmp": kv["k_cmp"], "v_cmp": kv["v_cmp"], "k_slc": kv["k_slc"],
            "v_slc": kv["k_slc"] if spec.mla else kv["v_slc"], "k_win": kv["k_win"], "v_win": kv["v_win"],
            "split_tiles": repr(plan.decode.split_tiles), "scoring": repr(plan.decode.scoring),
            "overlap": f"overlap_chunks={plan.decode.overlap_chunks}, overlap_blocks={plan.decode.overlap_blocks}, "
                       f"overlap_spill={plan.decode.overlap_spill}",
            "splits": f"split_waves={plan.decode.split_waves}, max_splits={plan.decode.max_splits}",
            "forms": f"selection_form={pystr(plan.decode.selection_form)}, index_form={pystr(plan.decode.index_form)}, "
                     f"topk_form={pystr(plan.decode.topk_form)}, topn_form={pystr(plan.decode.topn_form)}, "
                     f"cmp_form={pystr(plan.decode.cmp_form)}, chain={pystr(plan.decode.chain)}"}


def has_distillation(spec: Spec) -> bool:
    """DSA at token granularity trains its indexer by attention-score distillation (docs/distill.md)."""
    return spec.family == "dsa" and spec.selection.granularity == "token"


def render_module(spec: Spec, records: list | None = None, plan: Plan | None = None) -> str:
    """The module of `spec`; `plan` replaces the spec's own plan (specgen.compile.variants renders its variants
    so), otherwise `make_plan(spec)`."""
    spec = validated(spec)  # a Spec built in Python is checked exactly as a file is
    # One module template serves both families: DSA is the indexer-scored selection branch alone, without gates.
    context = module_context(spec, plan, records=records)
    context["has_distill"] = has_distillation(spec)
    if context["has_distill"]:
        context.update(distill_context(spec, None))
    return _environment().get_template("module.py.j2").render(**context)


def render_distill_module(spec: Spec, distill_plan: DistillPlan | None = None) -> str:
    """A standalone module: the spec constants, the dot helpers and the distillation section. `distill_plan`
    overrides the tiles (tests use small ones to exercise multi-trip loops at small T)."""
    plan = make_plan(spec)
    context = module_context(spec, plan)
    context["header"] = header(spec, "the indexer distillation loss")
    context.update(distill_context(spec, distill_plan))
    return _environment().get_template("distill_test_wrapper.py.j2").render(**context)


# Specs this cheap (query heads x head dim) get the full CPU matrix of sequence lengths; bigger ones one tiny T.
SMALL_SPEC_WIDTH = 512


def render_test(spec: Spec) -> str:
    spec = validated(spec)
    small = spec.heads.q * spec.head_dim.qk <= SMALL_SPEC_WIDTH
    return _environment().get_template("test_module.py.j2").render(
        spec=spec, header=header(spec, "its tests"), cpu_seqlens=cpu_seqlens(spec, small),
        gpu_seqlens=gpu_seqlens(spec), cpu_batch=2 if small else 1, has_distill=has_distillation(spec),
        varlen_seqlens=varlen_seqlens(spec, small), gpu_varlen_seqlens=gpu_varlen_seqlens(spec),
        gpu_varlen_backward_seqlens=gpu_varlen_backward_seqlens(spec),
        decode_prompts=decode_prompts(spec, small), decode_gpu_prompts=decode_gpu_prompts(spec),
        decode_cases=repr(decode_cases(spec, small)).replace("'", '"'), decode_small=small, small=small,
        scatter=scatter_backward(spec))


@dataclass(frozen=True)
class Built:
    spec: Spec
    module: Path
    test: Path
    changed: tuple[Path, ...]


def output_paths(spec: Spec, out_dir: Path) -> tuple[Path, Path]:
    """The module and the test a build of `spec` writes into `out_dir`."""
    return Path(out_dir) / f"{spec.name}.py", Path(out_dir) / f"test_{spec.name}.py"


def build(spec: Spec, out_dir: Path, spec_path: Path | None = None, plan: Plan | None = None) -> Built:
    """Render both files first, then write them: a template error leaves the old files untouched.

    `spec_path` locates the spec's tuning record (`<name>.tune.json` beside it), whose configs are baked in; `plan`
    replaces the spec's own plan (render_module).
    """
    return build_all([(spec, spec_path)], out_dir, plans={spec.name: plan} if plan is not None else None)[0]


def build_all(specs: list[tuple[Spec, Path | None]], out_dir: Path, plans: dict[str, Plan] | None = None
              ) -> list[Built]:
    """Build several specs into `out_dir`, all or nothing: every file is rendered, then written to a temporary file
    beside its target, and only when all are written are they renamed over their targets. A failure (a full disk,
    a read-only folder, a folder where a module must go) raises BuildError naming the path and the fix and removes
    the temporary files; temporary files a killed build left behind are removed first."""

    out_dir = Path(out_dir)
    files: list[tuple[Path, str]] = []
    built = []
    for spec, spec_path in specs:
        spec = validated(spec)
        module_path, test_path = output_paths(spec, out_dir)
        plan = (plans or {}).get(spec.name)
        files += [(module_path, render_module(spec, load_records(spec, spec_path), plan)), (test_path, render_test(spec))]
        built.append((spec, module_path, test_path))
    changed = set(write_files(files))
    return [Built(spec, m, t, tuple(p for p in (m, t) if p in changed)) for spec, m, t in built]


