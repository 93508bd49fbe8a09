"""Training: the custom ops (forward and backward, with fake implementations for torch.compile), their autograd
rule, the eager autograd.Function, the differentiable entry point (`<family>_attention`) and the pieces of the
classic `<FAMILY>Function`. Parametrised by a generated module's descriptor, whose `forward`/`backward` are the
generated launch sequences. Design: docs/backward.md.
"""

from __future__ import annotations

import inspect
from typing import Optional

import torch

from . import ArgumentError, compiling, packed_map
from .checks import check_given_indices, check_inputs, results
from .launches import out_is_branch_output
from .varlen import is_packed_call, native_indices, pack, pad_indices, unpad_results

_P = inspect.Parameter


def _signature(names, extra, returns: int, writes_p: bool = False) -> inspect.Signature:
    """A signature torch.library reads the op schema from: Tensor arguments `names`, then `extra` (name, type), then
    `distill_p`: the forward's an optional tensor defaulting to None (read by neither forward), the backward's
    (`writes_p`, the op's one mutated argument) a required tensor, empty where the call has none (`no_p`).
    A mutated argument must not be optional: torch 2.11's functionalisation drops a trailing argument equal to its
    default before the ADInplaceOrView step indexes the mutated ones (IndexError under torch.compile)."""
    params = [_P(n, _P.POSITIONAL_OR_KEYWORD, annotation=torch.Tensor) for n in names]
    params += [_P(n, _P.POSITIONAL_OR_KEYWORD, annotation=t) for n, t in extra]
    params.append(_P("distill_p", _P.POSITIONAL_OR_KEYWORD, annotation=torch.Tensor) if writes_p else
                  _P("distill_p", _P.POSITIONAL_OR_KEYWORD, annotation=Optional[torch.Tensor], default=None))
    return inspect.Signature(params, return_annotation=tuple[(torch.Tensor,) * returns])


def no_p(like: torch.Tensor) -> torch.Tensor:
    """The backward op's `distill_p` where the call gave none: an empty fp32 tensor on `like`'s device, which the
    op's body reads as None (as it reads a given one with no rows: there is nothing to fill)."""
    return like.new_empty((0,), dtype=torch.float32)


def autocast_input(x, dtype):
    return x.to(dtype) if isinstance(x, torch.Tensor) and x.is_floating_point() else x


class Attention:
    """The training host code of one generated module: built once at its import (custom ops registered then)."""

    def __init__(self, desc):
        self.desc = desc
        self.n_args = len(desc.args)
        self.op_name = desc.op_name
        self.eager = self._eager_function()
        self.fwd_op, self.bwd_op = self._register_ops()

    # The custom ops' implementations -------------------------------------------------------------------------

    def fwd_impl(self, *inputs, copy_given_indices: bool = False):
        """The forward as a custom op: (out, lse, indices, branch_out, kc, vc); empty tensors for what the spec or
        the call lacks (no selection, no compression, branch outputs not saved, or saved as `out` itself: one
        ungated branch, runtime.launches.out_is_branch_output; a custom op's outputs may not alias each other, so
        the autograd rule saves `out` in their place). `inputs`: the tensor arguments,
        then indices, save_branch_outputs, cu_seqlens and max_seqlen (a native packed call: the per-token
        arguments are a batch of one [1, total, ...]; else None and 0). `copy_given_indices`: return given indices
        as a copy (the custom op's body: its outputs may not alias its inputs); eager calls return a view of them
        (V3.2 at 64k: 0.5 GiB not copied; autograd's version counter still catches an in-place change of them
        before the backward)."""
        desc = self.desc
        args, (indices, save_branch_outputs, cu_seqlens, max_seqlen) = inputs[:-4], inputs[-4:]
        q = args[0]
        with torch.autocast(q.device.type, enabled=False):
            state = desc.forward(*args, indices=indices, save_branch_outputs=save_branch_outputs,
                                 **_layout(cu_seqlens, max_seqlen, q))
        if desc.selects:
            idx = state.indices
            if indices is not None:  # a view, not the tensor: autograd saves no input returned as-is
                idx = idx.clone() if copy_given_indices else idx.view_as(idx)
        else:
            idx = q.new_empty((0,), dtype=torch.int32)
        branch_out = (state.branch_out if save_branch_outputs and not out_is_branch_output(desc)
                      else q.new_empty((0,)))
        kc = state.kc if desc.needs_compressed_kv else q.new_empty((0,))
        vc = state.vc if desc.has_compression_branch else q.new_empty((0,))
        return state.out, state.lse, idx, branch_out, kc, vc

    def fwd_fake(self, *inputs):
        d = self.desc
        q, save_branch_outputs, cu_seqlens = inputs[0], inputs[-3], inputs[-2]
        B, T = q.shape[0], q.shape[1]
        if d.needs_compressed_kv:
            # Packed: the capacity of the packed pooled rows (runtime.varlen.Layout.pooled).
            NC = (torch.sym_max(0, (T - d.cmp_block) // d.cmp_stride + 1) if cu_seqlens is None
                  else T // d.cmp_stride)
        nb = d.n_branches
        return (q.new_empty((B, T, d.heads_q, d.dim_v)),
                q.new_empty((B, T, d.heads_q, nb), dtype=torch.float32),
                q.new_empty((B, T, d.heads_kv, d.top_k) if d.selects else (0,), dtype=torch.int32),
                q.new_empty((nb, B, T, d.heads_q, d.dim_v) if save_branch_outputs and not out_is_branch_output(d)
                            else (0,)),
                q.new_empty((B, NC, d.heads_kv, d.dim_qk) if d.needs_compressed_kv else (0,)),
                q.new_empty((B, NC, d.heads_kv, d.dim_v) if d.has_compression_branch else (0,)))

    def bwd_impl(self, dout, *saved, distill_p=None):
        """Gradients of the differentiable inputs (desc.diff_args, in order) from the saved forward state: the
        differentiable inputs, then lse, indices, branch_out, kc, vc, and the forward's cu_seqlens and
        max_seqlen. `distill_p`: the entry point's (checked by check_distill_p), filled by the selection's
        backward."""
        saved, (cu_seqlens, max_seqlen) = saved[:-2], saved[-2:]
        extra = {} if distill_p is None else {"distill_p": distill_p}
        with torch.autocast(dout.device.type, enabled=False):
            return self.desc.backward(dout, *saved, **_layout(cu_seqlens, max_seqlen, dout), **extra)

    def bwd_fake(self, dout, *saved):
        return tuple(x.new_empty(x.shape) for x in saved[:-7])

    # Autograd ------------------------------------------------------------------------------------------------

    def grads_by_input(self, grads):
        """The backward op's gradients placed at the forward op's inputs (tensor arguments, indices, save,
        cu_seqlens, max_seqlen)."""
        placed = [None] * (self.n_args + 4)
        for i, g in zip(self.desc.diff_positions, grads):
            placed[i] = g
        return tuple(placed)

    def setup_context(self, ctx, inputs, output):
        save_branch_outputs, cu_seqlens, max_seqlen = inputs[-3:]
        out, lse, idx, branch_out, kc, vc = output
        ctx.save_for_backward(*(inputs[i] for i in self.desc.diff_positions), lse, idx,
                              self._branch_outputs(out, branch_out, save_branch_outputs), kc, vc, cu_seqlens)
        ctx.saved_branch_outputs = save_branch_outputs
        ctx.max_seqlen = max_seqlen
        ctx.mark_non_differentiable(lse, idx, branch_out, kc, vc)

    def _branch_outputs(self, out, branch_out, saved: bool):
        """What the backward reads as the branch outputs: `out` itself for one ungated branch (its un-gated output,
        bit for bit; saved by autograd, so an in-place change of `out` before the backward is refused), else the
        forward's copies."""
        return out if saved and out_is_branch_output(self.desc) else branch_out

    def backward_grads(self, ctx, d_out, bwd):
        if d_out is None:
            return (None,) * (self.n_args + 4)
        if not ctx.saved_branch_outputs:
            raise RuntimeError(f"{self.desc.spec_name}: backward through a forward that kept no branch outputs; call "
                               f"{self.desc.attention_name} with grad enabled and a differentiable input")
        return self.grads_by_input(bwd(d_out, *ctx.saved_tensors, ctx.max_seqlen))

    def backward_rule(self, ctx, d_out, *unused):
        def bwd(*saved):
            return self.bwd_op(*saved, no_p(d_out) if ctx.distill_p is None else ctx.distill_p)
        return self.backward_grads(ctx, d_out, bwd) + (None,)

    def op_setup_context(self, ctx, inputs, output):
        """The custom op's setup_context: its last input is `distill_p` (None when the call left it out), kept on
        ctx for the backward op, which writes it (the op's mutated argument)."""
        inputs, ctx.distill_p = _split_p(inputs, self.n_args + 4)
        self.setup_context(ctx, inputs, output)

    def _eager_function(self):
        impl = self

        class _EagerAttention(torch.autograd.Function):
            """The custom ops' implementations and autograd rule, for eager calls. A custom op's first call imports
            torch's compiler stack (torch._dynamo: 0.86 s of a warm process's first training step on the H100) and
            every call pays its dispatch; torch.compile traces the custom ops instead (`runtime.compiling()`).
            Its last input is the entry point's `distill_p` (or None), kept on ctx for the backward to fill."""

            @staticmethod
            def forward(*inputs):
                return impl.fwd_impl(*inputs[:-1])

            @staticmethod
            def setup_context(ctx, inputs, output):
                impl.op_setup_context(ctx, inputs, output)
                # Outputs the caller does not differentiate (lse, branch_out, kc, vc) reach the backward as None,
                # not as zeros autograd would fill for them (branch_out: ~0.13 ms of Llama-3's backward at 16k).
                ctx.set_materialize_grads(False)

            @staticmethod
            def backward(ctx, d_out, *unused):
                def bwd(*saved):
                    return impl.bwd_impl(*saved, distill_p=ctx.distill_p)
                return impl.backward_grads(ctx, d_out, bwd) + (None,)

        return _EagerAttention

    def _register_ops(self):
        """The custom ops specgen::{name}_{hash}_{record}_fwd/_bwd. A second module object of the same spec and
        tuning record (the committed copy and a specgen.load cache copy, say) reuses the ops the first registered:
        same kernels, same configs."""
        try:
            return getattr(torch.ops.specgen, self.op_name + "_fwd"), getattr(torch.ops.specgen, self.op_name + "_bwd")
        except AttributeError:
            pass
        desc = self.desc

        # Each op's last argument is distill_p: the forward's None by default (absent when a call leaves it out: the
        # body gets the arguments as passed) and read by none, the backward's required and written (`_signature`).
        bwd_names = ("dout",) + desc.diff_args + ("lse", "indices", "branch_out", "kc", "vc")
        packed = (("cu_seqlens", Optional[torch.Tensor]), ("max_seqlen", int))
        n_fwd, n_bwd = self.n_args + 4, len(bwd_names) + len(packed)

        def fwd_impl(*inputs):
            return self.fwd_impl(*_split_p(inputs, n_fwd)[0], copy_given_indices=True)

        def bwd_impl(*inputs):  # distill_p is required here: always passed, empty where the call had none
            inputs, p = inputs[:n_bwd], inputs[n_bwd]
            return self.bwd_impl(*inputs, distill_p=p if p.numel() else None)

        fwd_impl.__signature__ = _signature(
            desc.arg_names, (("indices", Optional[torch.Tensor]), ("save_branch_outputs", bool)) + packed, 6)
        bwd_impl.__signature__ = _signature(bwd_names, packed, len(desc.diff_args), writes_p=True)
        fwd = torch.library.custom_op(f"specgen::{self.op_name}_fwd", fwd_impl, mutates_args=())
        fwd.register_fake(lambda *inputs: self.fwd_fake(*_split_p(inputs, n_fwd)[0]))
        bwd = torch.library.custom_op(f"specgen::{self.op_name}_bwd", bwd_impl, mutates_args=("distill_p",))
        bwd.register_fake(lambda *inputs: self.bwd_fake(*_split_p(inputs, n_bwd)[0]))
        fwd.register_autograd(self.backward_rule, setup_context=self.op_setup_context)
        return fwd, bwd

    # Entry points --------------------------------------------------------------------------------------------

    def attention(self, args: tuple, *, indices=None, return_lse=False, return_indices=False, cu_seqlens=None,
                  max_seqlen=None, distill_p=None):
        """`<family>_attention` on its tensor inputs `args` (in `desc.args` order); see the generated docstring.
        `distill_p`: the scatter-path specs' (check_distill_p)."""
        desc = self.desc
        fn = desc.attention_name
        q = args[0]
        if isinstance(q, torch.Tensor) and torch.is_autocast_enabled(q.device.type):
            args = tuple(autocast_input(x, desc.dtype) for x in args)
        if is_packed_call(cu_seqlens, max_seqlen):
            if desc.native_varlen:
                return self._attention_packed(fn, args, indices, return_lse, return_indices, cu_seqlens, max_seqlen,
                                              distill_p)
            self.check_distill_p(fn, distill_p, args, ())  # refused: no native packed backward emits p
            # Padded to [N, max_seqlen] by differentiable index ops (modules without packed kernels): the unpad's
            # backward gives the padded rows a zero output gradient, so the batched backward sends them nothing.
            packed, args = pack(desc, fn, cu_seqlens, max_seqlen, args)
            indices = pad_indices(desc, fn, indices, packed, args[0].device)
            o, lse, idx = self.attention(args, indices=indices, return_lse=True, return_indices=True)
            return unpad_results(desc, packed, o, lse, idx, return_lse, return_indices)
        args = check_inputs(desc, fn, args)
        q = args[0]
        indices = check_given_indices(desc, fn, indices, q.shape[0], q.shape[1], q.device)
        distill_p = self.check_distill_p(fn, distill_p, args, (q.shape[0], q.shape[1]))
        out, lse, idx = self._run(args, indices, None, 0, distill_p)
        return results(out, lse, idx if desc.selects else None, return_lse, return_indices)

    def _attention_packed(self, fn, args, indices, return_lse, return_indices, cu_seqlens, max_seqlen,
                          distill_p=None):
        """A packed call run natively, forward and backward (docs/varlen.md): the packed inputs [total, ...] go to
        the custom ops as a batch of one [1, total, ...] (views) with cu_seqlens and max_seqlen, the kernels walk
        the batch's tile tables, and every saved tensor and gradient buffer is linear in total."""
        desc = self.desc
        packed, args = pack(desc, fn, cu_seqlens, max_seqlen, args, pad=False)
        indices = native_indices(desc, fn, indices, packed, args[0].device)
        distill_p = self.check_distill_p(fn, distill_p, args, (args[0].shape[0],))
        args = tuple(x.unsqueeze(0) if a.per_token else x for a, x in zip(desc.args, args))
        out, lse, idx = self._run(args, None if indices is None else indices.unsqueeze(0), cu_seqlens,
                                  packed.max_seqlen, None if distill_p is None else distill_p.unsqueeze(0))
        # squeeze, not [0]: the backward of a select makes a zeroed [1, total, ...] copy of the output gradient
        # (8 GiB for V3.2 at 64k tokens), a squeeze's is a view of it.
        return results(out.squeeze(0), lse.squeeze(0), idx.squeeze(0) if desc.selects else None, return_lse,
                       return_indices)

    def _need_grad(self, args) -> bool:
        return torch.is_grad_enabled() and any(args[i].requires_grad for i in self.desc.diff_positions)

    def _run(self, args, indices, cu_seqlens, max_seqlen, distill_p=None):
        """(out, lse, indices) of checked arguments: through the custom ops under torch.compile, else the eager
        autograd.Function when a gradient is needed (`distill_p` reaching its backward), else the forward alone."""
        need_grad = self._need_grad(args)
        inputs = (*args, indices, need_grad, cu_seqlens, max_seqlen)
        if compiling():
            return self.fwd_op(*inputs, distill_p)[:3]
        if need_grad:
            return self.eager.apply(*inputs, distill_p)[:3]
        return self.fwd_impl(*inputs)[:3]

    def check_distill_p(self, fn: str, p, args, rows: tuple):
        """`distill_p`, checked before any kernel runs: fp32 rows + (heads_kv, top_k), contiguous, on q's device,
        for a spec whose selection backward is the scatter path (token selection by an indexer; its kernels and
        the deterministic dq kernel emit p), a call that computes a gradient (eager, or under torch.compile: the
        backward op's mutated argument)."""
        if p is None:
            return None
        d = self.desc
        if d.selection_backward != "scatter" or d.unit != 1 or not d.indexer_heads:
            raise ArgumentError(f"{fn}: argument `distill_p` needs a spec with a token-level indexer selection whose "
                                f"backward is the scatter path; {d.spec_name} has none: compute the target with "
                                f"distill_loss(..., lse_main=lse) instead")
        if not rows:
            raise ArgumentError(f"{fn}: argument `distill_p` is not supported on a packed call of {d.spec_name} "
                                f"(it has no native packed backward); pass distill_p=None")
        if not self._need_grad(args):
            raise ArgumentError(f"{fn}: argument `distill_p` is filled by the backward, but this call computes no "
                                f"gradient (grad mode off, or no differentiable input requires grad); pass "
                                f"distill_p=None")
        shape = rows + (d.heads_kv, d.top_k)
        q = args[0]
        if not isinstance(p, torch.Tensor) or tuple(p.shape) != shape or p.dtype != torch.float32:
            got = (f"{type(p).__name__}" if not isinstance(p, torch.Tensor)
                   else f"{p.dtype} of shape {list(p.shape)}")
            raise ArgumentError(f"{fn}: argument `distill_p` must be a torch.float32 tensor of shape {list(shape)} "
                                f"(q's rows, heads_kv, top_k), got {got}; allocate it with torch.empty({list(shape)}, "
                                f"dtype=torch.float32, device=q.device)")
        if p.device != q.device:
            raise ArgumentError(f"{fn}: argument `distill_p` is on {p.device} but `q` is on {q.device}; allocate it "
                                f"on q's device")
        if not p.is_contiguous() or p.requires_grad:
            raise ArgumentError(f"{fn}: argument `distill_p` must be contiguous and not require grad (the backward "
                                f"writes it in place); allocate it with torch.empty")
        return p

    def function_forward(self, ctx, args: tuple, indices):
        """`<FAMILY>Function.forward`: (out, lse, indices), the backward's state saved on ctx."""
        out, lse, idx, branch_out, kc, vc = (self.fwd_op if compiling() else self.fwd_impl)(*args, indices, True,
                                                                                           None, 0)
        ctx.save_for_backward(*(args[i] for i in self.desc.diff_positions), lse, idx,
                              self._branch_outputs(out, branch_out, True), kc, vc)
        ctx.mark_non_differentiable(lse, idx)
        if not compiling():  # lse's gradient arrives as None, not filled with zeros (see `_eager_function`)
            ctx.set_materialize_grads(False)
        return out, lse, idx

    def function_backward(self, ctx, d_out):
        """`<FAMILY>Function.backward`: gradients of its inputs (the tensor arguments, then indices)."""
        if d_out is None:  # the caller differentiated lse alone (non-differentiable): nothing flows back
            return (None,) * (self.n_args + 1)
        if compiling():
            grads = self.bwd_op(d_out, *ctx.saved_tensors, None, 0, no_p(d_out))
        else:
            grads = self.bwd_impl(d_out, *ctx.saved_tensors, None, 0)
        return self.grads_by_input(grads)[:self.n_args + 1]


def _split_p(inputs: tuple, n: int) -> tuple:
    """(the first n arguments of a custom op's call, its trailing distill_p or None where the call left it out)."""
    return inputs[:n], (inputs[n] if len(inputs) > n else None)


def _layout(cu_seqlens, max_seqlen: int, x) -> dict:
    """The launch sequences' `varlen` keyword of a native packed call (the inputs a batch of one [1, total, ...]),
    or none for a batched one."""
    if cu_seqlens is None:
        return {}
    return {"varlen": packed_map(cu_seqlens, max_seqlen, x.shape[1]).layout()}
