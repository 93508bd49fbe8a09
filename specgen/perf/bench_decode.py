"""GPU benchmark of one decoding step (`specgen bench --decode`): the generated step against dense decoding of the
same cache, in the same run, with the step's bandwidth floor from the analysis.

Per (batch, context): a contiguous cache (so the dense baseline reads the very same tensors) is filled with random
values in place (no prompt copy: the largest points need the memory), every sequence at `context` tokens with its
q_len new tokens already appended. Reported: the step's median time (`triton.testing.do_bench`), eagerly and
replayed from one captured CUDA graph; the KV bytes the step must read (`analysis.decode_step_bytes`: the floor, and
what the generated step reads); achieved bandwidth against the device-to-device copy bandwidth measured in the
same run; dense SDPA (query of length q_len, lower-right causal mask when q_len > 1) and the speedup over it.
Points that do not fit the GPU's memory are skipped with that reason in the record.

`layouts` ("contiguous", "paged"): with "paged" each point is timed again on a paged cache holding the very same
values (`paged_copy`: the contiguous cache's rows copied into pages of the spec's page size, the pages of the pool
handed out in a random order, as a serving engine's pool is after some churn), so both layouts select the same
blocks and the row's `paged_vs_contiguous` is the layout's cost alone. Dense is timed on the contiguous cache.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import re
import time
from pathlib import Path

import torch

from ..compile.analysis import decode_step_bytes
from .bench import _commit, _median_ms, copy_bandwidth_gbps, kernel_times
from ..compile.jit import load
from ..model.spec import Spec

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
DEVICE = "cuda"  # a module constant so a CPU smoke test can point the logic elsewhere


LAYOUTS = ("contiguous", "paged")


# A batch of 0 ("--batches max") is the largest whose caches take at most this fraction of the GPU's free memory
# (issue 19's model-shape target: the largest batch whose caches fit); the rest is the step's and SDPA's workspace.
FIT_FRACTION = 0.8


def fit_batch(module, spec: Spec, T: int, layouts: tuple, free_bytes: int) -> int:
    """The largest batch whose caches at T tokens (one per layout timed) fit FIT_FRACTION of `free_bytes`."""
    per_sequence = _cache_bytes(module, spec, 1, T) * len(layouts)
    return max(0, int(FIT_FRACTION * free_bytes) // per_sequence)


def _cache_bytes(module, spec: Spec, B: int, T: int) -> int:
    e = torch.finfo(module.DTYPE).bits // 8
    per_token = sum(d for n, d in module.CACHE_TENSORS.items() if n not in module.RING_TENSORS) * spec.heads.kv * e
    return B * T * per_token


def fill_cache(module, spec: Spec, B: int, T: int, q_len: int, device=None):
    """A contiguous cache of B sequences at T tokens (room for q_len more), its values random (drawn in place: the
    largest points need the memory a prompt copy would take)."""
    Cache = getattr(module, f"{spec.family.upper()}Cache")
    device = device or DEVICE
    cache = Cache(B, max_seqlen=T + q_len, device=device,
                  **{n: torch.randn(w, device=device, dtype=module.DTYPE) * 0.01 for n, w in _pool_shapes(spec).items()})
    for x in cache.tensors.values():
        if x.dtype == torch.float8_e4m3fn:  # no normal_ kernel for fp8: draw in fp32, round once
            x.copy_(torch.randn(x.shape, device=x.device).to(x.dtype))
        else:
            x.normal_()
    if hasattr(cache, "k_idx_scale"):
        cache.k_idx_scale.uniform_(0.005, 0.02)  # amax/448 of unit-scale index keys
    for attr in ("kc", "vc"):
        if hasattr(cache, attr):
            getattr(cache, attr).normal_()
    cache.seqlens.fill_(T)
    cache.host_seqlens = [T] * B
    return cache


def paged_copy(cache, generator: torch.Generator | None = None):
    """A paged cache holding `cache`'s (contiguous) values: each sequence's rows cut into pages of the spec's page
    size, the pool's pages handed out in a random order (`generator`), the per-sequence tensors (pooled blocks,
    rings, lengths, pool weights) copied as they are. The rows go where the paged cache's own prefill puts them
    (its `_rows` and `_store`: fp8 moves as bytes), from views of the contiguous rows (no copy of the cache)."""
    d = cache.DESCRIPTOR
    B, ps = cache.batch, d.page_size
    per = -(-cache.tcap // ps)
    table = torch.randperm(B * per, generator=generator).to(torch.int32).reshape(B, per).to(cache.device)
    pool = getattr(cache, "pool", None) or {}
    paged = type(cache)(B, num_pages=B * per, block_table=table, device=cache.device, **pool)
    # Contiguous flat rows are b * tcap + position, in order: position p of sequence b goes to paged row rows[b, p].
    rows = paged._rows(torch.arange(cache.tcap, device=cache.device)[None, :].expand(B, -1)).flatten()
    for name, x in cache.tensors.items():
        if name in d.ring_tensors:
            paged.tensors[name].copy_(x)
        else:
            paged._store(name, rows, x.flatten(0, 1))
    if hasattr(cache, "k_idx_scale"):
        paged.k_idx_scale.view(-1, d.hkv).index_copy_(0, rows, cache.k_idx_scale.view(-1, d.hkv))
    for attr in ("kc", "vc"):  # pooled blocks: the paged cache may hold more (its capacity is whole pages)
        if hasattr(cache, attr):
            src = getattr(cache, attr)
            getattr(paged, attr)[:, :src.shape[1]] = src
    paged.seqlens.copy_(cache.seqlens)
    paged.host_seqlens = list(cache.host_seqlens)
    return paged


def _step_inputs(module, spec: Spec, B: int, q_len: int) -> dict:
    dt = module.DTYPE
    kw = {"q": torch.randn(B, q_len, spec.heads.q, spec.head_dim.qk, device=DEVICE, dtype=dt)}
    if spec.gated:
        kw["gates"] = torch.sigmoid(torch.randn(B, q_len, spec.heads.q, len(spec.branches), device=DEVICE)).to(dt)
    if spec.indexer is not None:
        hi = spec.heads.kv * spec.indexer.heads
        kw["q_idx"] = torch.randn(B, q_len, hi, spec.indexer.head_dim, device=DEVICE, dtype=dt)
        kw["w_idx"] = torch.randn(B, q_len, hi, device=DEVICE, dtype=dt)
    return kw


def _flex_ms(spec: Spec, qt, kt, vt, q_len: int) -> float | str:
    """FlexAttention's decoding path (compiled; a lower-right causal block mask when q_len > 1)."""
    try:
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention

        T = kt.shape[2]
        mask = None
        if q_len > 1:
            def lower_right(b, h, qi, kv):
                return kv <= qi + (T - q_len)
            mask = create_block_mask(lower_right, None, None, q_len, T, device=qt.device)
        fn = torch.compile(flex_attention, dynamic=False)

        def run():
            return fn(qt, kt, vt, block_mask=mask, scale=spec.softmax_scale, enable_gqa=spec.heads.q != spec.heads.kv)
        run()
        return _median_ms(run)
    except Exception as exc:
        return f"unsupported: {str(exc).splitlines()[0][:120]}"


def flashinfer_decode_ms(spec: Spec, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> float | str:
    """FlashInfer's paged batch decode (the serving engines' dense decode) over the same K/V, viewed as pages of 16
    tokens (a contiguous cache is a trivially paged one), or why it cannot run here: not installed, or shapes its
    decode kernel does not take (more than one new query, d_qk != d_v)."""
    try:
        import flashinfer
    except ImportError:
        return "unsupported: flashinfer is not installed in this environment (pip install flashinfer-python)"
    B, q_len, hq, d = q.shape
    T, hkv = k.shape[1], k.shape[2]
    page = 16
    if q_len != 1:
        return "unsupported: FlashInfer's decode kernel takes one new query per sequence"
    if spec.head_dim.qk != spec.head_dim.v or spec.mla:
        return "unsupported: FlashInfer's paged decode needs d_qk == d_v (MLA decode is a separate kernel)"
    if T % page:
        return f"unsupported: the context {T} is not a whole number of {page}-token pages"
    try:
        pages = T // page
        k_pages = k[:, :T].reshape(B * pages, page, hkv, d)
        v_pages = v[:, :T].reshape(B * pages, page, hkv, d)
        indptr = torch.arange(B + 1, dtype=torch.int32, device=q.device) * pages
        indices = torch.arange(B * pages, dtype=torch.int32, device=q.device)
        last = torch.full((B,), page, dtype=torch.int32, device=q.device)
        workspace = torch.empty(128 << 20, dtype=torch.uint8, device=q.device)
        wrapper = flashinfer.BatchDecodeWithPagedKVCacheWrapper(workspace, "NHD")
        wrapper.plan(indptr, indices, last, hq, hkv, d, page, pos_encoding_mode="NONE", q_data_type=q.dtype,
                     kv_data_type=k.dtype, sm_scale=spec.softmax_scale)
        q1 = q[:, 0].contiguous()

        def run():
            return wrapper.run(q1, (k_pages, v_pages))
        run()
        return _median_ms(run)
    except Exception as exc:  # an API or shape this version refuses is a result to record, not a failure
        return f"unsupported: {type(exc).__name__}: {str(exc).splitlines()[0][:120] if str(exc) else ''}"


def _dense_ms(spec: Spec, cache, q: torch.Tensor, ring: tuple, flex: bool = False) -> dict:
    """SDPA over the cache's (first) K/V set: what a dense model's decode step reads (`ring`: the names the cache
    keeps only as a ring of recent tokens, the module's RING_TENSORS)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.nn.functional import scaled_dot_product_attention as sdpa

    names = [n for n in cache.tensors if n not in ring]
    k = cache.tensors[next(n for n in names if n.startswith("k") and n != "k_idx")]
    v = k[..., :spec.head_dim.v] if spec.mla else cache.tensors[next(n for n in names if n.startswith("v"))]
    q_len = q.shape[1]
    T = int(cache.host_seqlens[0])
    qt, kt, vt = q.transpose(1, 2), k[:, :T].transpose(1, 2), v[:, :T].transpose(1, 2)
    gqa = spec.heads.q != spec.heads.kv
    if spec.heads.kv == 1 and q_len == 1:
        # MQA (MLA's absorbed form): the query heads are rows of one head, as FlashMLA runs them. SDPA's fused
        # backends refuse a single kv head broadcast over 128 query heads, and this reads the cache once.
        qt, gqa = q, False
    mask = None
    if q_len > 1:
        from torch.nn.attention.bias import causal_lower_right

        mask = causal_lower_right(q_len, T)
    out = {}
    for name, backend in (("cudnn", SDPBackend.CUDNN_ATTENTION), ("flash", SDPBackend.FLASH_ATTENTION),
                          ("efficient", SDPBackend.EFFICIENT_ATTENTION)):
        try:
            with sdpa_kernel(backend):
                def run():
                    return sdpa(qt, kt, vt, attn_mask=mask, scale=spec.softmax_scale, enable_gqa=gqa)
                run()
                out[name] = _median_ms(run)
        except Exception as exc:  # a backend refusing these shapes is a result, not a failure
            out[name] = f"unsupported: {str(exc).splitlines()[0][:120]}"
    if flex:
        out["flex"] = _flex_ms(spec, qt.contiguous(), kt, vt, q_len)
    out["flashinfer"] = flashinfer_decode_ms(spec, q, k[:, :T], v[:, :T])
    return out


@contextlib.contextmanager
def _descriptor_swapped(module, other):
    """`module`'s decode step and cache class on descriptor `other` while the block runs, the plan's after it (also
    after an error)."""
    d = module._DECODE
    Cache = getattr(module, d.cache_class)
    module._DECODE, Cache.DESCRIPTOR = other, other
    try:
        yield other
    finally:
        module._DECODE, Cache.DESCRIPTOR = d, d


@contextlib.contextmanager
def scoring_path(module, scoring: str | None):
    """The module's decode step on the compression scorer's other path (`DecodePlan.scoring`: "partials" or
    "logits"), for timing both in one run: its descriptor replaced by a copy with that scoring while the block
    runs. None or the plan's own: unchanged."""
    d = module._DECODE
    if scoring is None or scoring == d.scoring:
        yield d
        return
    if d.scorer != "compression":
        raise ValueError(f"--decode-scoring applies to compression-scored selection; {d.spec_name} has none")
    # The logits path has only the row top-n (runtime.decode_step.check_forms).
    swapped = dataclasses.replace(d, scoring=scoring, **({"topn_form": "row"} if scoring == "logits" else {}))
    with _descriptor_swapped(module, swapped) as other:
        yield other


def parse_forms(name: str) -> dict:
    """A `--decode-forms` entry as descriptor fields: "plan" (the plan's forms), or '+'-joined names of the launch
    forms (LAUNCH_FORMS: DecodePlan.form), runtime.decode_step.SELECTION_FORMS (the MLA selection kernel),
    INDEX_FORMS (the index scores), TOPK_FORMS (the indexer top-k), TOPN_FORMS (the compression scorer's top-n) and
    CMP_FORMS (the compression kernel's launch), e.g. "fused", "fused+chunked_ticket", "cmp_s3_r2", "whole",
    "whole+cmp_s3_r2" or "ks_pf+wide+fold"; "ms<N>" caps every branch's key-range splits at N (the descriptor's
    max_splits: at batch 1 dsa_v32's selection writes 32 splits' fp32 partials of 128 heads x 512, 8 MiB, where it
    gathers 2.4 MiB of keys); "cs<N>" lets the epilogue load up to N splits at once where rows are few (the
    descriptor's combine_sb, a power of two to 64); what is not named keeps the plan's form."""
    from ..runtime.decode_step import (CHAINS, CMP_FORMS, INDEX_FORMS, LAUNCH_FORMS, SELECTION_FORMS, TOPK_FORMS,
                                       TOPN_FORMS, WHOLE_FORMS)

    out = {}
    kinds = (("form", LAUNCH_FORMS), ("selection_form", SELECTION_FORMS), ("index_form", INDEX_FORMS),
             ("topk_form", TOPK_FORMS), ("topn_form", TOPN_FORMS), ("cmp_form", CMP_FORMS), ("chain", CHAINS))
    caps = {"ms": ("max_splits", "split caps"), "cs": ("combine_sb", "epilogue loads")}
    for part in name.split("+"):
        if part == "plan":
            continue
        if re.fullmatch(r"(ms|cs)[1-9][0-9]*", part):
            field, what = caps[part[:2]]
            if field in out:
                raise ValueError(f"--decode-forms {name!r}: two {what}; name at most one")
            out[field] = int(part[2:])
            continue
        field = next((f for f, names in kinds if part in names), None)
        if field is None:
            raise ValueError(f"--decode-forms: unknown form {part!r}; launch forms {list(LAUNCH_FORMS)}, selection "
                             f"forms {list(SELECTION_FORMS)}, index forms {list(INDEX_FORMS)}, top-k forms "
                             f"{list(TOPK_FORMS)}, top-n forms {list(TOPN_FORMS)}, compression forms "
                             f"{list(CMP_FORMS)}, launch chains {list(CHAINS)}, a split cap ms<N>, epilogue "
                             f"loads cs<N>, or 'plan'")
        if field in out:  # "split+fused" would silently time the last one
            raise ValueError(f"--decode-forms {name!r}: {out[field]!r} and {part!r} are both {field.replace('_', ' ')}s; "
                             f"name at most one of each kind in an entry (separate entries time them side by side)")
        out[field] = part
    if out.get("form") in WHOLE_FORMS and out.get("topn_form", "row") != "row":
        raise ValueError(f"--decode-forms {name!r}: the {out['form']!r} form runs its own top-n in its program; "
                         f"{out['topn_form']!r} applies to the split, cw and fused forms (drop it, or time it on one "
                         f"of those)")
    if out.get("form") == "persist" and out.get("topn_form", "chunked_ticket") != "chunked_ticket":
        raise ValueError(f"--decode-forms {name!r}: the 'persist' form always runs the 'chunked_ticket' top-n in "
                         f"its launch; drop {out['topn_form']!r}")
    return out


def check_decode_forms(module, names) -> None:
    """Every `--decode-forms` entry applies to `module`'s decode step (ValueError naming the entry otherwise), so a
    form that does not fit a spec (an MLA selection form on a GQA spec, "fused" on an indexer-scored one) is refused
    before any GPU work rather than after the caches and the earlier rows."""
    for name in names or ():
        try:
            with decode_forms(module, name):
                pass
        except ValueError as exc:
            raise ValueError(f"--decode-forms {name!r} on {module._DECODE.spec_name}: {exc}") from None


@contextlib.contextmanager
def decode_forms(module, name: str | None):
    """The module's decode step with the kernel forms `name` (parse_forms) while the block runs, as scoring_path
    does for the scorer's path: the descriptor replaced by a copy, checked by runtime.decode_step.check_forms.
    None or "plan": unchanged."""
    from ..runtime.decode_step import check_forms

    d = module._DECODE
    fields = parse_forms(name) if name else {}
    if not fields:
        yield d
        return
    other = dataclasses.replace(d, **fields)
    check_forms(other)
    with _descriptor_swapped(module, other):
        yield other


def _needs_partials(fields: dict, d) -> bool:
    """Whether the forms `fields` (parse_forms) run on the partials scoring path only (the cw, fused, whole and persist
    launch forms, the chunked top-n forms): `specgen bench` leaves out their pairs with the logits path."""
    from ..runtime.decode_step import WHOLE_FORMS

    # The plan's own top-n is the partials path's default only (scoring_path gives the logits path "row").
    return (fields.get("form", d.form) in ("fused", "cw", "persist", *WHOLE_FORMS)
            or fields.get("topn_form", "row") != "row")


def bench_decode(spec: Spec, contexts: list[int], batches: list[int], *, q_len: int = 1, dense: bool = True,
                 graph: bool = True, flex: bool = False, spec_path=None,
                 scorings: list[str] | None = None, forms: list[str] | None = None,
                 layouts: tuple = ("contiguous",)) -> tuple[float, list[dict]]:
    """`scorings`: the compression scorer's paths to time on each cache, one row each (default the plan's);
    `forms`: the step's forms (parse_forms: launch forms "split" / "fused" / "whole" / "auto", the top-n forms, the
    DSA step's kernel forms), one row per (scoring, forms); the fused and whole launch forms and the chunked top-n
    forms run on the partials path only, their pairs with the logits path are left out. A row's "launch" is the
    launch form the step ran ("auto" resolved by the batch rule, runtime.decode_step.launch_form). `layouts`: the
    caches each row is timed on (LAYOUTS; a row per layout, "paged" on a copy of the contiguous values, which comes
    with the contiguous rows its paged_vs_contiguous compares with)."""
    from ..runtime.decode_step import WHOLE_FORMS, launch_form

    # In LAYOUTS' order, contiguous first: a paged row's ratio needs the contiguous row of its forms.
    layouts = tuple(x for x in LAYOUTS if x in layouts or (x == "contiguous" and "paged" in layouts))
    module = load(spec, spec_path)
    plan = module._DECODE   # the forms' rows swap it (decode_forms)
    decode = getattr(module, f"{spec.family}_decode")
    copy_gbps = copy_bandwidth_gbps(device=DEVICE)
    rows = []
    for asked in batches:
        for T in contexts:
            # Both layouts are held at once (the paged one is a copy of the contiguous values).
            free = torch.cuda.mem_get_info()[0]
            B = asked or fit_batch(module, spec, T + q_len, layouts, free)
            row = {"batch": B, "context": T, "q_len": q_len}
            if not asked:
                row["batch_rule"] = f"the largest whose caches fit {FIT_FRACTION:g} x the free memory"
            need = _cache_bytes(module, spec, B, T + q_len) * len(layouts)
            if B < 1 or need > FIT_FRACTION * free:
                row["skipped"] = (f"caches of {need / 2**30:.1f} GiB do not fit ({free / 2**30:.1f} GiB free)" if B
                                  else f"no sequence's caches fit ({free / 2**30:.1f} GiB free)")
                rows.append(row)
                print(spec.name, row)
                continue
            contiguous = fill_cache(module, spec, B, T, q_len)
            caches = {"contiguous": contiguous}
            if "paged" in layouts:
                caches["paged"] = paged_copy(contiguous, torch.Generator().manual_seed(B * 1000003 + T))
            kw = _step_inputs(module, spec, B, q_len)
            q = kw.pop("q")
            out = torch.empty(B, q_len, spec.heads.q, spec.head_dim.v, device=DEVICE, dtype=module.DTYPE)
            base, dense_times, by_layout = dict(row), None, {}
            paths = [(sc, f, lay) for sc in scorings or [None] for f in forms or [None] for lay in layouts
                     if not (_needs_partials(parse_forms(f or "plan"), plan) and (sc or plan.scoring) != "partials")]
            for scoring, form, layout in paths:
                cache = caches[layout]

                def step():
                    decode(q, cache, **kw, out=out)

                row = dict(base, layout=layout)
                with scoring_path(module, scoring), decode_forms(module, form) as d:
                    row["scoring"], row["form"] = d.scoring, d.form
                    row["launch"] = launch_form(d, B, DEVICE)
                    whole = row["launch"] in WHOLE_FORMS  # its program runs the row top-n, whatever topn_form says
                    row["forms"] = f"{d.selection_form}+{d.index_form}+{d.topk_form}" + (
                        f"+{d.topn_form}" if d.topn_form != "row" and not whole else "") + (
                        f"+{d.cmp_form}" if d.cmp_form != "cmp_base" else "") + (
                        "+pdl" if d.chain == "pdl" else "") + (
                        f"+ms{d.max_splits}" if d.max_splits != plan.max_splits else "") + (
                        f"+cs{d.combine_sb}" if d.combine_sb != plan.combine_sb else "")
                    if d.cmp_branch:
                        row["cmp_launch"] = _cmp_launch(d, B, q_len, cache)
                    _time_step(spec, step, d, B, T, q_len, copy_gbps, graph, row)
                if dense:
                    # Dense decoding once per point, on the contiguous cache: every row compares with the same times.
                    if dense_times is None:
                        dense_times = _dense_ms(spec, contiguous, q, module.RING_TENSORS, flex=flex)
                    row["dense"] = dense_times
                _speedup(row)
                by_layout[(scoring, form, layout)] = row
                other = by_layout.get((scoring, form, "contiguous"))
                if layout == "paged" and other is not None:
                    row["paged_vs_contiguous"] = _step_time(row) / _step_time(other)
                # Printed as it comes (a run cut off by its time limit keeps what it printed), the kernels in us.
                print(spec.name, {k: v for k, v in row.items() if k not in ("bytes", "kernels")},
                      {k.strip("_")[:32]: round(v * 1000, 1) for k, v in row.get("kernels", {}).items() if v >= 1e-3})
                rows.append(row)
            del caches, contiguous, kw, q, out
            torch.cuda.empty_cache()
    return copy_gbps, rows


def _step_time(row: dict) -> float:
    """The row's step time: replayed from its CUDA graph where it was captured, else eager."""
    return row["graph_ms"] if isinstance(row.get("graph_ms"), float) else row["step_ms"]


def _speedup(row: dict) -> None:
    mine = _step_time(row)
    best = min((v for v in row.get("dense", {}).values() if isinstance(v, float)), default=None)
    if best is not None:
        row["dense_best_ms"] = best
        row["speedup"] = best / mine


def _cmp_launch(d, B: int, q_len: int, cache) -> dict:
    """The compression kernel's launch in the descriptor's cmp_form at this batch (runtime.decode_step.cmp_launch,
    cmp_splits; the whole launch form runs one split, in its one kernel at the form's stages and warps): what a row
    of the record times."""
    from ..runtime import decode_whole
    from ..runtime.decode_step import WHOLE_FORMS, cmp_launch, cmp_splits, launch_form, split_rows

    scores = 0 if d.scorer != "compression" else 2 if d.scoring == "partials" else 1  # decode_step.branch's SCORES
    tile, stages, warps, resident = cmp_launch(d, scores, q_len)
    programs = B * d.hkv * split_rows(d, "compression", q_len)[2]
    whole = launch_form(d, B, cache.device) in WHOLE_FORMS
    if whole:  # the whole kernel's own launch (decode_whole.launch: at least BASE_STAGES stages on cmp_base)
        tile, stages, warps = decode_whole.launch(d, (tile, stages, warps))
    return {"tile": tile, "stages": stages, "warps": warps, "resident": resident,
            "splits": 1 if whole else cmp_splits(d, programs, cache.nc_cap - 1, cache.device)}


def _bytes_view(d):
    """`d` as decode_step_bytes reads it: the partials' tile is the compression form's (runtime.decode_step
    .cmp_launch), which the analysis (below the runtime) cannot look up."""
    from ..runtime.decode_step import cmp_launch

    if getattr(d, "cmp_form", "cmp_base") == "cmp_base":
        return d
    return dataclasses.replace(d, split_tiles={**d.split_tiles, "compression": cmp_launch(d).tile})


def _time_step(spec: Spec, step, d, B: int, T: int, q_len: int, copy_gbps: float, graph: bool, row: dict) -> dict:
    """Eager and graph-replayed times of `step` on descriptor `d`'s path, its bytes and kernels, into `row`."""
    step()
    ms = _median_ms(step)
    b = decode_step_bytes(spec, T, B, q_len, _bytes_view(d))
    row.update(step_ms=ms, bytes=b, achieved_gbps=b["floor"] / ms / 1e6,
               floor_ms=b["floor"] / copy_gbps / 1e6, impl_floor_ms=b["implementation"] / copy_gbps / 1e6)
    row["x_floor"] = ms / row["floor_ms"]
    # Where the step's time goes: every GPU kernel of an eager step (ms per step).
    row["kernels"] = dict(sorted(kernel_times(step, calls=5, names="all").items(), key=lambda kv: -kv[1]))
    if graph:
        try:
            g = torch.cuda.CUDAGraph()
            s = torch.cuda.Stream()
            s.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(s):
                step()
            torch.cuda.current_stream().wait_stream(s)
            with torch.cuda.graph(g):
                step()
            g.replay()
            row["graph_ms"] = _median_ms(g.replay)
            row["graph_x_floor"] = row["graph_ms"] / row["floor_ms"]
            del g
        except Exception as exc:
            row["graph_ms"] = f"capture failed: {str(exc).splitlines()[0][:160]}"
    mine = _step_time(row)
    # A dense step's floor: its cache bytes at the copy rate (SDPA's kernels may be far from it).
    row["dense_floor_ms"] = b["dense"] / copy_gbps / 1e6
    row["x_dense_floor"] = row["dense_floor_ms"] / mine
    return row


def _pool_shapes(spec: Spec) -> dict:
    cmp_ = spec.compression
    if cmp_ is None or cmp_.pool != "linear":
        return {}
    hkv, l, dqk, dv = spec.heads.kv, cmp_.block, spec.head_dim.qk, spec.head_dim.v
    shapes = {"w_pool_k": (hkv, l * dqk, dqk), "w_pool_v": (hkv, l * dv, dv)}
    if cmp_.position_embedding:
        shapes.update(pe_pool_k=(l, dqk), pe_pool_v=(l, dv))
    return shapes


def record_decode(spec: Spec, copy_gbps: float, rows: list[dict], out_dir: Path) -> Path:
    out_dir.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y-%m-%d")
    entry = {
        "kind": "decode", "spec": spec.name, "spec_hash": spec.hash, "device": torch.cuda.get_device_name(),
        "date": stamp, "commit": _commit(), "torch": torch.__version__,
        "triton": __import__("triton").__version__, "dtype": spec.dtype,
        "layouts": sorted({r.get("layout", "contiguous") for r in rows if "skipped" not in r}),
        "shapes": {"heads": [spec.heads.q, spec.heads.kv], "head_dim": [spec.head_dim.qk, spec.head_dim.v]},
        "copy_gbps": copy_gbps,
        "timing": "triton.testing.do_bench median, ms; graph_ms: one captured CUDA graph replayed",
        "bytes": "analysis.decode_step_bytes: floor = cache bytes the step must read; implementation = what the "
                 "generated step reads",
        "rows": rows,
    }
    path = out_dir / f"{stamp}_{spec.name}_decode.jsonl"
    with path.open("a") as f:
        f.write(json.dumps(entry) + "\n")
    return path


# The kernel forms before the switchable ones and the plan's own on the partials path: not printed.
_PLAN_FORMS = ("base+tile", "base+tile+radix", "base+tile+radix+chunked_ticket")


def table(spec: Spec, copy_gbps: float, rows: list[dict]) -> str:
    lines = [f"{spec.name} ({spec.hash}) decode step, {spec.dtype}, copy bandwidth {copy_gbps:.0f} GB/s",
             f"{'B':>3} {'ctx':>7} {'path':>20} {'ms':>8} {'graph':>8} {'floor':>8} {'x floor':>8} {'GB/s':>7} {'dense':>8} speedup"]
    for r in rows:
        if "skipped" in r:
            lines.append(f"{r['batch']:>3} {r['context']:>7}  skipped: {r['skipped']}")
            continue
        g = r.get("graph_ms")
        form = f"auto:{r.get('launch')}" if r.get("form") == "auto" else r.get("form")
        path = "/".join(x for x in (r.get("layout") if r.get("layout") == "paged" else None, r.get("scoring"),
                                    form if form != "split" else None,
                                    r.get("forms") if r.get("forms") not in _PLAN_FORMS else None) if x) or "-"
        lines.append(f"{r['batch']:>3} {r['context']:>7} {path:>20} {r['step_ms']:>8.3f} "
                     f"{g if isinstance(g, str) else f'{g:8.3f}' if g else '':>8} {r['floor_ms']:>8.3f} "
                     f"{r.get('graph_x_floor', r['x_floor']):>8.2f} {r['achieved_gbps']:>7.0f} "
                     + (f"{r['dense_best_ms']:>8.3f} {r['speedup']:.2f}x" if r.get("dense_best_ms") else f"{'-':>8} -")
                     + (f"  paged/contiguous {r['paged_vs_contiguous']:.3f}" if "paged_vs_contiguous" in r else ""))
        top = list(r.get("kernels", {}).items())[:6]
        if top:
            lines.append("      " + ", ".join(f"{name.strip('_')[:36]} {ms * 1000:.0f} us" for name, ms in top))
    return "\n".join(lines)
