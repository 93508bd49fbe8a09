"""A DSA training step timed whole and by piece, against dense attention's training step in the same run.

The step is what a user's training loop runs per layer in the sparse stage (docs/distill.md):

    indices = index_topk(q_idx, k_idx, w_idx)                                  # no gradient
    out, lse = dsa_attention(q, k, indices=indices, return_lse=True)           # sparse attention
    dq, dk = autograd.grad(out, (q, k), dout)                                  # its backward
    loss = distill_loss(q, k, q_idx, k_idx, w_idx, indices=indices, lse_main=lse[..., 0])
    dq_idx, dk_idx, dw_idx = autograd.grad(loss, (q_idx, k_idx, w_idx))       # the indexer's gradient

and the same step with the probabilities shared (`step_shared_p_ms`; docs/distill.md, "Sharing the attention
backward's probabilities"): the backward fills a preallocated `p` (dsa_attention(..., distill_p=p)) and the loss
takes it (distill_loss(..., p_main=p)) instead of recomputing the main logits over the selected keys; that loss
is also timed alone (`distill_from_p_fwd_bwd_ms`). And, timed apart, the warm-up stage's dense distillation loss (forward + backward; quadratic in T, so only up to
`dense_distill_max`), and for a spec with `unabsorbed` the same loss from q and k in that form (a key per query
head; docs/distill.md, "The dense stage from the unabsorbed heads"): forward and forward + backward with lse_main
given (`distill_dense_unabsorbed_fwd_ms`, `distill_dense_unabsorbed_fwd_bwd_ms`). The dense baseline is causal SDPA
forward + backward (cuDNN and flash) of the attention the model would otherwise run: for an MLA spec the
multi-head attention of its unabsorbed heads (spec.unabsorbed: Hq heads of d_qk / d_v, V3.2's 192 / 128, as
DeepSeek-V3.2 prefills; an MLA spec without the field is refused unless the baseline is skipped), else the spec's
own heads. Memory: the step's peak beyond what was allocated before it, and that peak less the step's outputs and
gradients (the issue's "beyond inputs, outputs and gradients").
"""

from __future__ import annotations

import inspect

import torch

from .. import reference
from ..compile.analysis import flops
from ..compile.jit import load
from ..model.signature import differentiable_names
from ..model.spec import Spec
from .bench import _median_ms, dense_shapes_forward_ms, dense_shapes_training_ms, kernel_times, peak_extra_gib

def check_trainable(spec: Spec, dense: bool = True) -> None:
    """The step needs an indexer (its top-k and distillation loss), and its dense baseline (`dense`) an MLA spec's
    unabsorbed head dims: a clear refusal for other specs, before any GPU work."""
    if spec.indexer is None:
        raise ValueError(f"--training-step times DSA's indexer + sparse attention + distillation step; spec "
                         f"{spec.name!r} has no indexer (selection.scorer: indexer). Use `specgen bench` without "
                         f"--training-step for its forward/backward passes.")
    if dense:
        dense_baseline_shapes(spec)


def dense_baseline_shapes(spec: Spec) -> dict:
    """The dense attention the step is measured against: heads, head dims and softmax scale. An MLA spec's is the
    multi-head attention of its unabsorbed heads (spec.unabsorbed; the same logits, so the spec's scale); one
    without the field is refused (no dims are assumed)."""
    if spec.mla:
        un = spec.unabsorbed
        if un is None:
            raise ValueError(f"spec {spec.name!r} is MLA without `unabsorbed` head dims: its dense baseline is the "
                             f"multi-head attention before absorption, whose dims only the spec can say; add "
                             f"`unabsorbed: {{qk: ..., v: ...}}` (DeepSeek-V3: 192, 128), or skip the baseline "
                             f"(--no-dense)")
        return {"heads": [spec.heads.q, spec.heads.q], "head_dim": [un.qk, un.v], "scale": spec.softmax_scale,
                "what": "unabsorbed MHA (MLA's dense prefill form)"}
    return {"heads": [spec.heads.q, spec.heads.kv], "head_dim": [spec.head_dim.qk, spec.head_dim.v],
            "scale": spec.softmax_scale, "what": "the spec's own heads"}


def _gib(*tensors) -> float:
    return sum(t.numel() * t.element_size() for t in tensors) / 2**30


def bench_training_step(spec: Spec, seqlens: list[int], *, dense: bool = True, dense_distill_max: int = 32768,
                        per_kernel: bool = True, spec_path=None, device: str = "cuda", timer=_median_ms,
                        memory=peak_extra_gib) -> list[dict]:
    """One row per T: each piece's median ms, the whole step's, its memory, the attention's TFLOP/s (analysis
    FLOPs; backward at FlashAttention's 2.5x convention), per-kernel times of the step, and the dense baseline.
    `device`, `timer` (fn -> ms) and `memory` (fn -> GiB) let the CPU tests run the same step under the
    interpreter."""
    check_trainable(spec, dense)
    module = load(spec, spec_path)
    attention = getattr(module, f"{spec.family}_attention")
    rows = []
    for T in seqlens:
        try:
            row = _step_row(spec, module, attention, T, dense_distill_max=dense_distill_max, per_kernel=per_kernel,
                            device=device, timer=timer, memory=memory)
        except torch.cuda.OutOfMemoryError as exc:  # a result to record (the 64k step on an 80 GB GPU, so far)
            rows.append({"T": T, "out_of_memory": str(exc).splitlines()[0][:200],
                         "max_allocated_gib": torch.cuda.max_memory_allocated() / 2**30})
            torch.cuda.empty_cache()
            continue
        torch.cuda.empty_cache()  # the step's tensors are gone with _step_row's frame
        if dense:
            shapes = dense_baseline_shapes(spec)
            (hq, hkv), (dqk, dv) = shapes["heads"], shapes["head_dim"]
            row["dense"] = {"shapes": shapes,
                            "forward": dense_shapes_forward_ms(hq, hkv, dqk, dv, T, spec.dtype, shapes["scale"]),
                            "fwd_bwd": dense_shapes_training_ms(hq, hkv, dqk, dv, T, spec.dtype, shapes["scale"])}
            row["speedup_step"] = {b: v / row["step_ms"] for b, v in row["dense"]["fwd_bwd"].items()
                                   if isinstance(v, float)}
            torch.cuda.empty_cache()
        rows.append(row)
    return rows


def step_inputs(spec: Spec, module, T: int, device: str) -> tuple[dict, dict, dict, dict, torch.Tensor]:
    """A training step's tensors at length T (B = 1, random, seeded by T): (every input `x`, the attention's
    differentiable inputs `main` (q, k, and v where the spec has its own, by the call contract; requiring grad), the
    indexer's inputs `fixed` the attention call takes beside given indices (detached: no gradient from it), the
    same inputs `idx_in` requiring grad for the distillation loss, and the output gradient `dout`)."""
    gen = torch.Generator(device=device).manual_seed(T)
    x = reference.make_inputs(spec, 1, T, dtype=module.DTYPE, device=device, generator=gen)
    main = {n: x[n].requires_grad_(True) for n in differentiable_names(spec)}
    fixed = {n: x[n].detach() for n in ("q_idx", "k_idx", "w_idx")}
    idx_in = {n: x[n].requires_grad_(True) for n in ("q_idx", "k_idx", "w_idx")}
    dout = torch.randn(1, T, spec.heads.q, spec.head_dim.v, dtype=module.DTYPE, device=device, generator=gen)
    return x, main, fixed, idx_in, dout


def _step_row(spec: Spec, module, attention, T: int, *, dense_distill_max: int, per_kernel: bool, device: str,
              timer, memory) -> dict:
    """One row of `bench_training_step` at length T."""
    _, main, fixed, idx_in, dout = step_inputs(spec, module, T, device)
    q, k = main["q"], main["k"]

    def topk():
        with torch.no_grad():
            return module.index_topk(*fixed.values())

    indices = topk()
    row = {"T": T, "indexer_topk_ms": timer(topk)}

    row["attention_forward_ms"], row["attention_backward_ms"], lse_main = _attention_times(
        spec, attention, main, fixed, indices, dout, timer)

    def distill(stage: str = "sparse", **target):
        """The loss and the indexer's gradients; the sparse stage's on the step's indices, its target lse_main
        unless `target` gives another (p_main)."""
        sel = indices if stage == "sparse" else None
        if stage == "sparse" and not target:
            target = {"lse_main": lse_main}
        loss = module.distill_loss(q.detach(), k.detach(), *idx_in.values(), indices=sel, stage=stage, **target)
        return (loss,) + torch.autograd.grad(loss, tuple(idx_in.values()))

    row["distill_sparse_fwd_bwd_ms"] = timer(distill)
    if T <= dense_distill_max:
        row["distill_dense_fwd_bwd_ms"] = timer(lambda: distill("dense"))
        if spec.unabsorbed is not None:
            row.update(_unabsorbed_dense_times(spec, module, idx_in, T, device, timer))

    def step(p=None):
        """The sparse-stage step; with `p` the attention backward fills it and the loss takes it (p_main)."""
        sel = topk()
        o, l_ = attention(**main, **fixed, indices=sel, return_lse=True, **({} if p is None else {"distill_p": p}))
        grads = torch.autograd.grad(o, tuple(main.values()), dout)
        target = {"lse_main": l_[..., 0].detach()} if p is None else {"p_main": p}
        loss = module.distill_loss(q.detach(), k.detach(), *idx_in.values(), indices=sel, stage="sparse", **target)
        return grads + torch.autograd.grad(loss, tuple(idx_in.values())) + (o,)

    if "distill_p" in inspect.signature(attention).parameters:
        row.update(_shared_p_times(step, distill, indices, timer))
    row["step_ms"] = timer(step)
    row["step_peak_extra_gib"] = memory(step)
    # What the step must hand back: the attention's output and every gradient (the inputs are already there).
    row["step_outputs_and_grads_gib"] = _gib(dout, *main.values(), *idx_in.values())
    row["step_beyond_outputs_and_grads_gib"] = row["step_peak_extra_gib"] - row["step_outputs_and_grads_gib"]
    f_fwd, f_bwd = flops(spec, T), flops(spec, T, "backward")
    row["attention_forward_tflops"] = f_fwd / row["attention_forward_ms"] / 1e9
    row["attention_backward_tflops"] = f_bwd / row["attention_backward_ms"] / 1e9
    if per_kernel:
        row["kernels"] = {name: {"ms": ms} for name, ms in kernel_times(step, calls=1, names="all").items()}
    return row


def unabsorbed_main(spec: Spec, module, idx: tuple, T: int, device: str, seed: int, lse: bool = True) -> dict:
    """The warm-up stage's main inputs in the spec's unabsorbed form: random q and k ([1, T, Hq, unabsorbed.qk]
    each, seeded by `seed`) and, with `lse`, their lse_main as the dense attention would return it (from the loss's
    own lse pass over the indexer inputs `idx` = (q_idx, k_idx, w_idx), untimed), else None."""
    gen = torch.Generator(device=device).manual_seed(seed)
    q, k = reference.make_unabsorbed_qk(spec, 1, T, dtype=module.DTYPE, device=device, generator=gen)
    lse_main = None
    if lse:
        with torch.no_grad():
            lse_main = module._distill_fwd(q, k, *(x.detach() for x in idx), None, None, None, 0)[2]
    return {"q": q, "k": k, "lse_main": lse_main}


def _unabsorbed_dense_times(spec: Spec, module, idx_in: dict, T: int, device: str, timer) -> dict:
    """The warm-up stage's loss from q and k in the spec's unabsorbed form (unabsorbed_main): forward and forward +
    backward with lse_main given, as a training step has it from its dense attention."""
    trained = tuple(idx_in.values())
    main = unabsorbed_main(spec, module, trained, T, device, seed=T + 1)

    def loss():
        return module.distill_loss(main["q"], main["k"], *trained, stage="dense", lse_main=main["lse_main"])

    def forward():
        with torch.no_grad():
            return loss()

    def fwd_bwd():
        value = loss()
        return (value,) + torch.autograd.grad(value, trained)

    return {"distill_dense_unabsorbed_fwd_ms": timer(forward),
            "distill_dense_unabsorbed_fwd_bwd_ms": timer(fwd_bwd)}


def _shared_p_times(step, distill, indices, timer) -> dict:
    """The step with the attention backward's p shared with the loss (one preallocated fp32 buffer in the indices'
    layout), and that loss alone (p_main from the step's last backward: the same indices, a deterministic top-k);
    checked first at the bench's size against the loss that recomputes p from lse_main (the relative differences
    of the loss and of the indexer's gradients go in the row: the GPU's check of the shared path at real sizes)."""
    p = torch.empty(indices.shape, dtype=torch.float32, device=indices.device)
    out = {"step_shared_p_ms": timer(lambda: step(p))}   # (first: it fills p)
    given, own = distill(p_main=p), distill()
    out["shared_p_loss_rel_diff"] = reference.rel_err(given[0], own[0])
    out["shared_p_grad_rel_diff"] = max(reference.rel_err(a, b) for a, b in zip(given[1:], own[1:]))
    out["distill_from_p_fwd_bwd_ms"] = timer(lambda: distill(p_main=p))
    return out


def _attention_times(spec: Spec, attention, main: dict, fixed: dict, indices, dout,
                     timer) -> tuple[float, float, torch.Tensor]:
    """The sparse attention's forward and backward medians and its log-sum-exp (the sparse-stage loss's lse_main);
    its output and graph are freed on return, before the loss is timed."""
    def forward():
        return attention(**main, **fixed, indices=indices, return_lse=True)

    out, lse = forward()
    assert torch.isfinite(out).all(), f"{spec.name} T={out.shape[1]}: the sparse attention left non-finite outputs"
    fwd_ms = timer(forward)
    bwd_ms = timer(lambda: torch.autograd.grad(out, tuple(main.values()), dout, retain_graph=True))
    return fwd_ms, bwd_ms, lse[..., 0].detach()


PIECES = (("indexer + top-k", "indexer_topk_ms"), ("attention forward", "attention_forward_ms"),
          ("attention backward", "attention_backward_ms"), ("distillation, sparse stage", "distill_sparse_fwd_bwd_ms"),
          ("whole step (sparse stage)", "step_ms"), ("distillation, warm-up (dense) stage", "distill_dense_fwd_bwd_ms"),
          # The step with the attention backward's p shared with the loss, and that loss alone.
          ("whole step, p shared", "step_shared_p_ms"), ("distillation, sparse stage, p given", "distill_from_p_fwd_bwd_ms"),
          # The warm-up stage's loss from unabsorbed q and k (specs with `unabsorbed`), lse_main given.
          ("warm-up loss, unabsorbed q/k: fwd", "distill_dense_unabsorbed_fwd_ms"),
          ("warm-up loss, unabsorbed q/k: fwd+bwd", "distill_dense_unabsorbed_fwd_bwd_ms"))


def table(spec: Spec, rows: list[dict]) -> str:
    """The rows as text: each piece's ms, the step against dense, memory, and the step's kernels."""
    lines = [f"{spec.name} ({spec.hash}) training step, B=1, {spec.dtype}"]
    for r in rows:
        lines.append(f"T = {r['T']}")
        if "out_of_memory" in r:
            lines.append(f"  out of memory ({r['max_allocated_gib']:.1f} GiB allocated at most): {r['out_of_memory']}")
            continue
        for label, key in PIECES:
            if key in r:
                rate = {"attention_forward_ms": r.get("attention_forward_tflops"),
                        "attention_backward_ms": r.get("attention_backward_tflops")}.get(key)
                lines.append(f"  {label:<38} {r[key]:>10.2f} ms" + (f"  {rate:.0f} TFLOP/s" if rate else ""))
        if "shared_p_loss_rel_diff" in r:
            lines.append(f"  p shared against p recomputed: loss {r['shared_p_loss_rel_diff']:.1e}, indexer gradients "
                         f"{r['shared_p_grad_rel_diff']:.1e} (relative)")
        if "dense" in r:
            fb = r["dense"]["fwd_bwd"]
            dense_txt = " / ".join(f"{v:.2f} ms" if isinstance(v, float) else "—" for v in fb.values())
            speed = " / ".join(f"{v:.2f}x" for v in r["speedup_step"].values()) or "n/a"
            lines.append(f"  dense fwd+bwd, {r['dense']['shapes']['what']} (cuDNN / flash): {dense_txt}; "
                         f"step speedup {speed}")
        lines.append(f"  memory: step peak {r['step_peak_extra_gib']:.2f} GiB beyond the inputs, of which "
                     f"{r['step_outputs_and_grads_gib']:.2f} outputs and gradients, "
                     f"{r['step_beyond_outputs_and_grads_gib']:.2f} beyond them")
        for name, k in sorted(r.get("kernels", {}).items(), key=lambda kv: -kv[1]["ms"])[:12]:
            lines.append(f"    {name[:90]}: {k['ms']:.3f} ms")
    return "\n".join(lines)


__all__ = ["bench_training_step", "check_trainable", "dense_baseline_shapes", "step_inputs", "table"]
