"""Time DSA's sparse attention backward on the GPU: the scatter path (atomics, the default) against the
deterministic inverse-index path (torch.use_deterministic_algorithms), same inputs, same run, and the sparse
attention forward (given indices) for reference. Prints ms (median of CUDA-event timings) and TFLOP/s with
FlashAttention's convention (backward = 2.5 x the forward's 2·H·(Dqk + Dv) FLOPs per selected (query, key)).

Options for the deterministic path (issue 17, docs/backward.md "Determinism"; bench/detmode_gpu.sh): `--det-reps`
its repetitions (default reps // 2); `--profile N` the N kernels with the most GPU time in one deterministic
backward (torch.profiler); `--bitwise` forward and backward again in deterministic mode, compared bit for bit with
the first ones; `--former-index` the inverse index's build alone in deterministic mode, as built now and with the
former scatter_ compaction (GPU time and its top kernels).

The scatter kernel's forms (issue 17, docs/backward.md "The scatter kernel's forms"; tuning.scatter_variants):
`--forms NAME ... | all` times the backward with each form in the same run (the module's default config of
`selection_scatter` swapped per form; the first length takes every named form, later lengths the former default
"w8" and the `--top` fastest of the first length), with per-kernel GPU times of one call (torch.profiler), TFLOP/s
(2.5 x the forward's FLOPs) and each form's gradients against w8's (relative error: the forms sum in other orders).
`--no-det` skips the deterministic path's timing (its 0.9 s a call at 16k). `--atomics-floor` times the scatter
kernel's fp32 atomic adds alone (a kernel that adds a constant [keys, 576] tile per trip into dK for the same
selection, one program per query and head chunk: 1, 2, 4 or 8 chunks a query), the floor any form of the kernel
with that many head chunks pays. `--vector-atomics` (GPU only) times the same adds by tl.atomic_add (which Triton
3.6 emits as atom.global.add.v4.f32 on aligned operands) and by explicit `red.global.add` of 1, 2 and 4 floats
(inline PTX): whether the vector width moves the floor.

The forms with fewer atomic adds per (query, key) (docs/backward.md, "Fewer atomics"): `--forms km_ks_k64
r64_rl_w16 split_k64 split_k128` times them beside the default; a split form's per-kernel times show its two
kernels (the scatter kernel computing dQ only, and `_selection_bwd_scatter_dkdv_kernel`).

Specs whose plan keeps the deterministic inverse-index kernels (token selection below loop_order's
FLOPs-per-atomic-byte threshold: groups of 1 and 2 at d_qk = d_v): `--variant bwd_scatter` renders the module with
its backward forced onto the scatter path (specgen.compile.variants), so the default timing is the scatter path's
and the deterministic one the inverse index's, the plan's choice, on the same inputs (as it timed dsa_gqa16_4
before the threshold moved). Specs without MLA take their own V
input; `--atomics-floor` and `--vector-atomics` model MLA's adds and apply to MLA specs only.

Usage: python bench/dsa_bwd.py [SPEC] [--seqlens 16384 32768] [--reps 5] [--det-reps N] [--profile N] [--bitwise]
       [--former-index] [--forms NAME ...|all] [--top 3] [--form-reps N] [--no-det] [--atomics-floor]
       [--vector-atomics] [--variant NAME] [--json FILE]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import time

import torch
import triton
import triton.language as tl

import specgen
from specgen import testing
from specgen.compile.plan import make_plan
from specgen.compile.tuning import SCATTER_BACKWARD_DEFAULT, scatter_variants
from specgen.compile.variants import load_variant
from specgen.model.spec import load_spec
from specgen.runtime import backward as runtime_backward
from specgen.perf.bench import _commit, event_median_ms, kernel_times


@contextlib.contextmanager
def deterministic():
    """PyTorch's deterministic mode without its NaN fill of torch.empty (time the kernels, as the records did)."""
    fill = torch.utils.deterministic.fill_uninitialized_memory
    torch.utils.deterministic.fill_uninitialized_memory = False
    try:
        with testing.deterministic_algorithms():
            yield
    finally:
        torch.utils.deterministic.fill_uninitialized_memory = fill


def _bits(x: torch.Tensor) -> torch.Tensor:
    return x.detach().contiguous().flatten().view(torch.uint8)


_CSR = runtime_backward._csr


def _former_csr(comp, R: int, n_seg: int, units_per_tile: int):
    """runtime.backward._csr as it was before commit cbcb3dd (several units per tile): the runs compacted by two
    scatter_ calls that send every non-first entry to one spare slot. Kept here to time it against the current
    build in deterministic mode, where torch takes scatter_ through its sort-based index_put_. Takes the sorted
    keys, as runtime.backward._csr does now."""
    if units_per_tile == 1:
        return _CSR(comp, R, n_seg, units_per_tile)
    device = comp.device
    padding = torch.iinfo(torch.int64).max
    upt = units_per_tile
    real = comp != padding
    key = torch.where(real, comp // upt, padding)
    n = comp.numel()
    first = real.clone()
    first[1:] &= key[1:] != key[:-1]
    slot = torch.where(first, torch.cumsum(first, 0) - 1, n)
    csum = torch.cumsum(torch.where(real, torch.ones_like(comp) << torch.where(real, comp % upt, 0), 0), 0)
    start = torch.full((n + 1,), n, dtype=torch.int64, device=device).scatter_(0, slot, torch.arange(n, device=device))
    end = start[1:n + 1] - 1
    bits = csum[end.clamp(0, max(n - 1, 0))] - torch.where(start[:n] > 0, csum[(start[:n] - 1).clamp(0)], 0)
    key = torch.full((n + 1,), padding, dtype=torch.int64, device=device).scatter_(0, slot, key)[:n]
    qpos = (key % R).to(torch.int32)
    offsets = torch.searchsorted(key // R, torch.arange(n_seg + 1, device=device))
    return offsets, qpos, bits


# Forms left out of `--forms all` (docs/backward.md's compile table): those that spill 120-1280 B at 4 warps, the
# replicated 16- and 64-key row-major tiles that "w8" and "ks_k64" dominate, and "s2" (stages without the prefetch;
# "pf_s2" / "pf_s3" time the pipelined tiles).
SPILLING_FORMS = ("w4", "k16_w4", "k64_w4", "km_k64_w4", "k16_w8", "k64_w8", "s2")


@triton.jit
def _atomics_floor_kernel(IDX, DK, T, TOP_K: tl.constexpr, TOP_K_PAD: tl.constexpr, DQK: tl.constexpr,
                          BLOCK_N: tl.constexpr):
    # The scatter kernel's dK adds without its products: per (query, head chunk), the query's selected keys
    # BLOCK_N at a time, a [BLOCK_N, DQK] fp32 tile added 64 dims at a time (MLA: dV lands in dK's first dims in the
    # same add). One kv head, batch 1.
    t = tl.program_id(0)
    idx_row = IDX + t.to(tl.int64) * TOP_K
    slots = tl.arange(0, TOP_K_PAD)
    n_units = tl.sum((tl.load(idx_row + slots, mask=slots < TOP_K, other=-1) >= 0).to(tl.int32), axis=0)
    for f0 in range(0, n_units, BLOCK_N):
        f = f0 + tl.arange(0, BLOCK_N)
        keys = tl.load(idx_row + f, mask=f < n_units, other=-1)
        ok = (keys >= 0) & (keys <= t)
        rows = keys.to(tl.int64) * DQK
        for d0 in tl.static_range(0, DQK, 64):
            cols = d0 + tl.arange(0, 64)
            tl.atomic_add(DK + rows[:, None] + cols[None, :], tl.full([BLOCK_N, 64], 1.0 / 1024, tl.float32),
                          mask=ok[:, None] & (cols < DQK)[None, :], sem="relaxed")


@triton.jit
def _red_vector_kernel(IDX, DK, T, TOP_K: tl.constexpr, TOP_K_PAD: tl.constexpr, DQK: tl.constexpr,
                       BLOCK_N: tl.constexpr, WIDTH: tl.constexpr):
    # _atomics_floor_kernel's adds (the same selection, bytes and programs) by explicit vector reductions of WIDTH
    # floats (1, 2 or 4) instead of tl.atomic_add (which Triton 3.6 already emits as atom.global.add.v4.f32).
    t = tl.program_id(0)
    idx_row = IDX + t.to(tl.int64) * TOP_K
    slots = tl.arange(0, TOP_K_PAD)
    n_units = tl.sum((tl.load(idx_row + slots, mask=slots < TOP_K, other=-1) >= 0).to(tl.int32), axis=0)
    VECS: tl.constexpr = 64 // WIDTH
    for f0 in range(0, n_units, BLOCK_N):
        f = f0 + tl.arange(0, BLOCK_N)
        keys = tl.load(idx_row + f, mask=f < n_units, other=-1)
        ok = (keys >= 0) & (keys <= t)
        rows = tl.where(ok, keys, 0).to(tl.int64) * DQK
        for d0 in tl.static_range(0, DQK, 64):
            vec = d0 + tl.arange(0, VECS) * WIDTH
            ptr = (DK + rows[:, None] + vec[None, :]).to(tl.int64)  # (an operand of the asm: as an integer)
            on = (ok[:, None] & (vec < DQK)[None, :]).to(tl.int32)
            val = tl.full([BLOCK_N, VECS], 1.0 / 1024, tl.float32)
            if WIDTH == 1:
                tl.inline_asm_elementwise(
                    "{ .reg .pred %p; setp.ne.b32 %p, $3, 0; @%p red.global.gpu.relaxed.add.f32 [$1], $2; "
                    "mov.b32 $0, 0; }", "=r,l,r,r", [ptr, val, on], dtype=tl.int32, is_pure=False, pack=1)
            elif WIDTH == 2:
                tl.inline_asm_elementwise(
                    "{ .reg .pred %p; setp.ne.b32 %p, $4, 0; @%p red.global.gpu.relaxed.add.v2.f32 [$1], {$2, $3}; "
                    "mov.b32 $0, 0; }", "=r,l,r,r,r", [ptr, val, val, on], dtype=tl.int32, is_pure=False, pack=1)
            else:
                tl.inline_asm_elementwise(
                    "{ .reg .pred %p; setp.ne.b32 %p, $6, 0; @%p red.global.gpu.relaxed.add.v4.f32 "
                    "[$1], {$2, $3, $4, $5}; mov.b32 $0, 0; }", "=r,l,r,r,r,r,r", [ptr, val, val, val, val, on],
                    dtype=tl.int32, is_pure=False, pack=1)


def vector_atomics(indices: torch.Tensor, T: int, dqk: int, chunks_list=(1, 4), block_n: int = 32,
                   reps: int = 3) -> dict:
    """{"tl.atomic_add" | "red.v1" | "red.v2" | "red.v4": {chunks: ms}}: the atomics floor's adds (the same bytes)
    by tl.atomic_add and by explicit vector reductions of 1, 2 and 4 floats; and whether each width's dK equals
    tl.atomic_add's (the adds are of 1/1024, exact in fp32 at these counts, so any order gives the same bits)."""
    idx = indices[0, :, 0].contiguous()
    top_k = idx.shape[-1]
    out: dict = {}
    sums = {}
    for width in (0, 1, 2, 4):
        name = "tl.atomic_add" if width == 0 else f"red.v{width}"
        out[name] = {}
        for chunks in chunks_list:
            dk = torch.zeros(T, dqk, device=idx.device, dtype=torch.float32)

            def run():
                if width == 0:
                    _atomics_floor_kernel[(T, chunks)](idx, dk, T, TOP_K=top_k,
                                                       TOP_K_PAD=triton.next_power_of_2(top_k), DQK=dqk,
                                                       BLOCK_N=block_n, num_warps=8)
                else:
                    _red_vector_kernel[(T, chunks)](idx, dk, T, TOP_K=top_k, TOP_K_PAD=triton.next_power_of_2(top_k),
                                                    DQK=dqk, BLOCK_N=block_n, WIDTH=width, num_warps=8)
            run()
            torch.cuda.synchronize()
            if chunks == chunks_list[0]:
                sums[name] = dk.clone()
            out[name][chunks] = event_median_ms(run, reps)
    out["same_sums"] = {n: bool(torch.equal(v, sums["tl.atomic_add"])) for n, v in sums.items()}
    return out


def atomics_floor(indices: torch.Tensor, T: int, dqk: int, chunks_list=(1, 2, 4, 8), block_n: int = 32,
                  reps: int = 3) -> dict:
    """ms of the scatter kernel's atomic adds alone for `chunks` head chunks a query (programs (T, chunks))."""
    idx = indices[0, :, 0].contiguous()
    top_k = idx.shape[-1]
    dk = torch.zeros(T, dqk, device=idx.device, dtype=torch.float32)
    out = {}
    for chunks in chunks_list:
        def run():
            _atomics_floor_kernel[(T, chunks)](idx, dk, T, TOP_K=top_k, TOP_K_PAD=triton.next_power_of_2(top_k),
                                               DQK=dqk, BLOCK_N=block_n, num_warps=8)
        out[chunks] = event_median_ms(run, reps)
    return out


def time_forms(mod, spec, names, backward_grads, reps: int, fwd_flops: float, profile: bool, T: int) -> dict:
    """{form: record} of the backward with each named scatter form (the module's default config swapped)."""
    variants = scatter_variants(make_plan(spec))
    default = dict(mod.CONFIGS["default"]["selection_scatter"])
    out, ref = {}, None
    try:
        for name in names:
            cfg = variants[name]
            mod.CONFIGS["default"]["selection_scatter"] = dict(cfg)
            # Cached blocks of other sizes (the shorter length's, the last form's) left at 64k no room for the
            # 18 GiB fp32 dQ accumulator beside the held inputs and state (2026-12-07, dc0b177): release them first.
            torch.cuda.empty_cache()
            rec = {"config": cfg}
            try:
                t0 = time.perf_counter()
                grads = backward_grads()
                torch.cuda.synchronize()
                rec["first_call_s"] = round(time.perf_counter() - t0, 2)
                rec["finite"] = all(bool(torch.isfinite(g).all()) for g in grads)
                if ref is None:
                    ref = [g.clone() for g in grads]
                rec["rel_err_vs_first"] = {n: float((a.float() - b.float()).norm() / b.float().norm())
                                           for n, a, b in zip(("dq", "dk", "dv"), grads, ref)}
                del grads
                rec["ms"] = event_median_ms(lambda: backward_grads(), reps)
                rec["tflops"] = 2.5 * fwd_flops / rec["ms"] / 1e9
                if profile:
                    times = kernel_times(lambda: backward_grads(), calls=1, names="all", warmup=False)
                    rec["kernels_ms"] = dict(_top(times, 4))
            except Exception as e:  # noqa: BLE001 (a form the GPU refuses is a result)
                rec["error"] = f"{type(e).__name__}: {str(e)[:200]}"
            out[name] = rec
            if "error" in rec:
                print(f"  T={T} form {name:14s} {rec['error']}", flush=True)
            else:
                kern = ", ".join(f"{k[:40]} {v:.2f}" for k, v in rec.get("kernels_ms", {}).items())
                print(f"  T={T} form {name:14s}{'*' if cfg == default else ' '} {rec['ms']:9.2f} ms "
                      f"{rec['tflops']:6.1f} TFLOP/s  vs {names[0]}: dq {rec['rel_err_vs_first']['dq']:.1e} "
                      f"dk {rec['rel_err_vs_first']['dk']:.1e}  finite {rec['finite']}  first call "
                      f"{rec['first_call_s']} s  [{kern}]", flush=True)
            torch.cuda.empty_cache()
    finally:
        mod.CONFIGS["default"]["selection_scatter"] = default
    return out


def _device_name() -> str:
    return torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu (a dry run under the interpreter)"


def _top(times: dict, n: int) -> list:
    return sorted(times.items(), key=lambda kv: -kv[1])[:n]


def _print_top(title: str, times: dict, n: int) -> None:
    print(f"{title}: {sum(times.values()):.1f} ms of GPU time in {len(times)} kernels; top {n}:", flush=True)
    for name, ms in _top(times, n):
        print(f"  {ms:10.2f} ms  {name[:110]}", flush=True)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("spec", nargs="?", default="specs/dsa_v32.yaml")
    ap.add_argument("--seqlens", type=int, nargs="*", default=[16384, 32768])
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--det-reps", type=int, default=None, help="deterministic-mode repetitions (default reps // 2)")
    ap.add_argument("--profile", type=int, default=0, metavar="N",
                    help="print the N kernels with the most GPU time of one deterministic backward")
    ap.add_argument("--bitwise", action="store_true",
                    help="deterministic mode: forward and backward again, equal bit for bit to the first ones")
    ap.add_argument("--former-index", action="store_true",
                    help="the inverse index's build alone in deterministic mode, now and with the former scatter_")
    ap.add_argument("--forms", nargs="*", default=None,
                    help="time the scatter kernel's named forms (tuning.scatter_variants; 'all': every one that "
                         "does not spill)")
    ap.add_argument("--top", type=int, default=3, help="forms timed after the first length: w8 and the N fastest")
    ap.add_argument("--form-reps", type=int, nargs="*", default=None,
                    help="repetitions of each form per length (default reps; one value per length, the last repeats)")
    ap.add_argument("--no-det", action="store_true", help="skip the deterministic path's timing")
    ap.add_argument("--atomics-floor", action="store_true", help="the scatter kernel's atomic adds alone")
    ap.add_argument("--vector-atomics", action="store_true",
                    help="the atomics floor's adds by tl.atomic_add and by red.global.add of 1, 2 and 4 floats "
                         "(first length, 1 and 4 head chunks; GPU only)")
    ap.add_argument("--variant", default=None,
                    help="render the module under this plan variant (specgen.compile.variants), e.g. bwd_scatter")
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    det_reps = args.det_reps if args.det_reps is not None else max(1, args.reps // 2)
    t_start = time.perf_counter()
    spec = load_spec(args.spec)
    mod = load_variant(spec, [args.variant]) if args.variant else specgen.load(spec)
    if mod is None:
        ap.error(f"variant {args.variant!r} does not apply to {spec.name}")
    mla_adds = spec.mla and (args.atomics_floor or args.vector_atomics)
    if (args.atomics_floor or args.vector_atomics) and not mla_adds:
        print(f"{spec.name}: --atomics-floor / --vector-atomics model MLA's adds; skipped", flush=True)
    print(f"{spec.name}{' (variant ' + args.variant + ')' if args.variant else ''}: selection backward "
          f"{mod._DESC.selection_backward}; {_device_name()}")
    rows = []
    for T in args.seqlens:
        dev = "cuda" if torch.cuda.is_available() else "cpu"
        if dev == "cuda":
            torch.cuda.empty_cache()  # the previous length's cached blocks (see time_forms)
        gen = torch.Generator(device=dev).manual_seed(T)
        H, dqk, dv, dt = spec.heads.q, spec.head_dim.qk, spec.head_dim.v, mod.DTYPE
        q = torch.randn(1, T, H, dqk, device=dev, dtype=dt, generator=gen)
        k = torch.randn(1, T, spec.heads.kv, dqk, device=dev, dtype=dt, generator=gen)
        # The attention inputs as _forward / _backward take them: MLA's V is K's first dims, no input of its own.
        kv = (k,) if spec.mla else (k, torch.randn(1, T, spec.heads.kv, dv, device=dev, dtype=dt, generator=gen))
        idx = spec.indexer
        q_idx = torch.randn(1, T, spec.heads.kv * idx.heads, idx.head_dim, device=dev, dtype=dt, generator=gen)
        k_idx = torch.randn(1, T, spec.heads.kv, idx.head_dim, device=dev, dtype=dt, generator=gen)
        w_idx = torch.randn(1, T, spec.heads.kv * idx.heads, device=dev, dtype=dt, generator=gen)
        dout = torch.randn(1, T, H, dv, device=dev, dtype=dt, generator=gen)
        state = mod._forward(q, *kv, q_idx, k_idx, w_idx, save_branch_outputs=True)
        indices = state.indices
        pairs = int((indices >= 0).sum()) * spec.heads.group_size
        fwd_flops = 2 * pairs * (dqk + dv)
        empty = q.new_empty((0,))

        def forward():
            mod._forward(q, *kv, q_idx, k_idx, w_idx, indices=indices, save_branch_outputs=True)

        def backward():
            return mod._backward(dout, q, *kv, state.lse, indices, state.branch_out, empty, empty)

        row = {"spec": spec.name, "variant": args.variant, "T": T, "gpu": _device_name(), "commit": _commit(),
               "forward_ms": event_median_ms(forward, args.reps)}
        row["forward_tflops"] = fwd_flops / row["forward_ms"] / 1e9
        if args.forms is not None:
            # The scatter kernel's forms, the former default first (its gradients the others' reference).
            variants = scatter_variants(make_plan(spec))
            if T == args.seqlens[0]:
                names = [n for n in variants if n not in SPILLING_FORMS] if args.forms in ([], ["all"]) else args.forms
                names = ["w8"] + [n for n in names if n != "w8"]
            else:
                timed = {n: r["ms"] for n, r in rows[0]["forms"].items() if "ms" in r}
                names = ["w8"] + [n for n in sorted(timed, key=timed.get) if n != "w8"][:args.top]
            reps_list = args.form_reps or [args.reps]
            reps = reps_list[min(args.seqlens.index(T), len(reps_list) - 1)]
            print(f"T={T}: forward {row['forward_ms']:.1f} ms ({row['forward_tflops']:.0f} TFLOP/s); scatter forms "
                  f"(median of {reps}; default {SCATTER_BACKWARD_DEFAULT}):", flush=True)
            row["forms"] = time_forms(mod, spec, names, backward, reps, fwd_flops, T == args.seqlens[0], T)
        if args.atomics_floor and mla_adds:
            chunks = (1, 2, 4, 8) if T == args.seqlens[0] else (1, 4)
            row["atomics_floor_ms"] = atomics_floor(indices, T, dqk, chunks, reps=2)
            print(f"T={T}: atomic adds alone (ms by head chunks a query): "
                  f"{ {c: round(v, 2) for c, v in row['atomics_floor_ms'].items()} } "
                  f"[{time.perf_counter() - t_start:.0f} s]", flush=True)
        if args.vector_atomics and mla_adds and T == args.seqlens[0] and torch.cuda.is_available():
            row["vector_atomics_ms"] = vector_atomics(indices, T, dqk, (1, 4), reps=2)
            print(f"T={T}: the atomics floor's adds by width (ms by head chunks a query; same sums as "
                  f"tl.atomic_add): {row['vector_atomics_ms']} [{time.perf_counter() - t_start:.0f} s]", flush=True)
        timed = [r for r in row.get("forms", {}).values() if r["config"] == mod.CONFIGS["default"]["selection_scatter"]
                 and "ms" in r]
        # (with --forms the default form's time is the scatter path's)
        row["scatter_ms"] = timed[0]["ms"] if timed else event_median_ms(backward, args.reps)
        row["scatter_tflops"] = 2.5 * fwd_flops / row["scatter_ms"] / 1e9
        if args.no_det:
            grads = exact = None
            print(f"T={T}: forward {row['forward_ms']:.1f} ms ({row['forward_tflops']:.0f} TFLOP/s); backward "
                  f"scatter {row['scatter_ms']:.1f} ms ({row['scatter_tflops']:.0f} TFLOP/s) "
                  f"[{time.perf_counter() - t_start:.0f} s]", flush=True)
        else:
            grads = backward()
            with deterministic():
                row["deterministic_ms"] = event_median_ms(backward, det_reps)
            # The two paths' gradients on these inputs (relative error of the scatter path's against the other's).
            with testing.deterministic_algorithms():
                exact = backward()
            row["rel_err"] = {n: float((a.float() - b.float()).norm() / b.float().norm())
                              for n, a, b in zip(("dq", "dk", "dv"), grads, exact)}
            row["deterministic_tflops"] = 2.5 * fwd_flops / row["deterministic_ms"] / 1e9
            print(f"T={T}: forward {row['forward_ms']:.1f} ms ({row['forward_tflops']:.0f} TFLOP/s); backward "
                  f"scatter {row['scatter_ms']:.1f} ms ({row['scatter_tflops']:.0f} TFLOP/s), deterministic "
                  f"{row['deterministic_ms']:.1f} ms ({row['deterministic_tflops']:.0f} TFLOP/s; median of "
                  f"{det_reps}); rel err scatter vs deterministic {row['rel_err']} "
                  f"[{time.perf_counter() - t_start:.0f} s]", flush=True)
        if args.bitwise and not args.no_det:  # (the bit-for-bit check compares with the deterministic backward)
            # Forward (indexer, top-k, attention) and backward again in deterministic mode (NaN fill on, as a
            # user's run has it): everything equal bit for bit to the first forward and the deterministic backward.
            with testing.deterministic_algorithms():
                again = mod._forward(q, *kv, q_idx, k_idx, w_idx, save_branch_outputs=True)
                grads2 = mod._backward(dout, q, *kv, again.lse, again.indices, again.branch_out, empty, empty)
            same = {n: bool(torch.equal(_bits(a), _bits(b))) for n, a, b in
                    (("out", again.out, state.out), ("lse", again.lse, state.lse),
                     ("indices", again.indices, state.indices), ("dq", grads2[0], exact[0]),
                     ("dk", grads2[1], exact[1]))}
            row["bitwise_equal"] = same
            print(f"bit for bit (deterministic mode, forward + backward again): {same} -> "
                  f"{'PASS' if all(same.values()) else 'FAIL'} [{time.perf_counter() - t_start:.0f} s]", flush=True)
            del again, grads2
        if args.profile:
            with deterministic():
                times = kernel_times(backward, calls=1, names="all", warmup=False)
            row["deterministic_kernels_ms"] = dict(_top(times, args.profile))
            _print_top("deterministic backward, one call (torch.profiler)", times, args.profile)
        if args.former_index:
            tile = specgen.runtime.launch_config(mod.CONFIGS, "selection_dkdv")["block_n"]

            def build():
                mod._selection_inverse_index(indices, T, tile)

            with deterministic():
                now = kernel_times(build, calls=1, names="all")
                runtime_backward._csr = _former_csr
                try:
                    former = kernel_times(build, calls=1, names="all", warmup=False)
                finally:
                    runtime_backward._csr = _CSR
            row["inverse_index_ms"] = {"now": sum(now.values()), "former_scatter": sum(former.values())}
            _print_top("inverse index build, deterministic mode, now", now, 5)
            _print_top("inverse index build, deterministic mode, former scatter_ compaction", former, 5)
        print(f"[{time.perf_counter() - t_start:.0f} s]", flush=True)
        rows.append(row)
        if args.json:  # each length's row as it completes (a run cut off by its time limit keeps them)
            with open(args.json, "a") as f:
                f.write(json.dumps(row) + "\n")
        del q, k, kv, q_idx, k_idx, w_idx, dout, state, indices, grads, exact
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    return 0


if __name__ == "__main__":
    sys.exit(main())
