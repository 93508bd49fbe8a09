"""The host side of a generated module's launch sequences: what every `_forward` / `_backward` does around its
kernels (allocating outputs and accumulators, packing each attention kernel's uniform argument list, the pooling's
launches, the selection's inverse index by groups of batch elements), and the expansion of the module's compact
launch-config tables.

The generated module keeps the order of its launches and which kernel each one runs (what differs per spec); the
objects here hold the rest, parametrised by the module's descriptor and the plan values it passes. Configs and
candidates are passed in at every call (the module's globals at call time: tests and `specgen tune` replace them).
"""

from __future__ import annotations

from typing import NamedTuple, Optional

import torch

from . import cdiv as _cdiv, launch, launch_config, launch_with, next_pow2
from . import selection as _selection


# Bytes the block-outer selection's per-(query, slot) partial buffers may take at once (forward outputs, backward dQ
# shares): longer or larger batches go by query chunks (runtime.selection.query_chunks). At Llama-3-8B heads a 64k
# sequence needs 4 GiB of forward partials, so the records' shapes run in one chunk.
KV_PARTIAL_BYTES = 8 << 30

# Memory of a training step (docs/backward.md, "Memory"). Both are on by default; False restores the former buffers
# (the tests' and bench/dsa_mem.py's baseline: the results are the same bits either way).
# DQ_IN_DTYPE: with one branch, one kernel writes each query's dQ row, once (HAS_PREV false: the scatter kernel, the
# dq kernel, the block-outer reduce, each query chunk its own rows), summing in fp32 registers; it stores the row in
# the spec's dtype straight into the gradient (tl.store rounds to nearest even, as torch's .to() did), so there is
# no fp32 [B, T, HQ, DQK] accumulator (DeepSeek-V3.2 at 64k: 18 GiB) and no cast copy (9 GiB). Several branches add
# into an fp32 accumulator.
DQ_IN_DTYPE = True
# OUT_IS_BRANCH_OUTPUT: with one ungated branch the result is the branch's un-gated output, bit for bit (the same
# fp32 row rounded once): the backward reads the saved `out` instead of a copy of it (V3.2 at 64k: 8 GiB).
OUT_IS_BRANCH_OUTPUT = True


def dq_dtype(desc) -> torch.dtype:
    """The dtype of the backward's dQ buffer: the spec's with one branch (DQ_IN_DTYPE), else fp32."""
    return desc.dtype if DQ_IN_DTYPE and desc.n_branches == 1 else torch.float32


def out_is_branch_output(desc) -> bool:
    """Whether a forward that keeps its branch outputs for the backward keeps `out` itself (one ungated branch)."""
    return OUT_IS_BRANCH_OUTPUT and desc.n_branches == 1 and not desc.gated


def config_table(tables: dict) -> dict:
    """{kernel: [config, ...]} from the module's compact form {kernel: (field names, [fields every config shares,]
    row, row, ...)}, where a kernel's entry may instead name an earlier kernel with the same candidates: the
    candidate lists are hundreds of configs, printed as rows of the values that vary under one header per kernel."""
    out: dict = {}
    for kernel, table in tables.items():
        if isinstance(table, str):
            out[kernel] = [dict(c) for c in out[table]]
            continue
        fixed, rows = (table[1], table[2:]) if len(table) > 1 and isinstance(table[1], dict) else ({}, table[1:])
        out[kernel] = [{**fixed, **dict(zip(table[0], row))} for row in rows]
    return out


def strides(*tensors) -> tuple:
    """The batch, token and head strides of each tensor, in turn: how every kernel takes a [B, T, H, D] operand."""
    return tuple(s for x in tensors for s in (x.stride(0), x.stride(1), x.stride(2)))


def chunk_grid(cfg: dict, programs: int, rest: int, chunks: int) -> tuple:
    """The grid of a kernel whose query tiles (`programs` on axis 0, `rest` = batch x kv heads on axis 1) are each
    split over `chunks` programs of head rows. By default the chunks are on axis 1, so a tile's chunks start a
    whole row of axis 0 apart; with the launch config's `chunk_inner` (the kernel's CHUNK_INNER) they are
    neighbours on axis 0 and run together, so what they all read (the tile's gathered keys) or add into (their
    dK/dV rows) is still in L2 for all but the first (docs/tuning.md, "Head chunks side by side")."""
    return (programs * chunks, rest) if cfg.get("chunk_inner") else (programs, rest * chunks)


class ForwardState(NamedTuple):
    """What one forward computed; the backward pass reads the saved pieces."""
    out: torch.Tensor
    lse: torch.Tensor                   # [B, T, HQ, N_BRANCHES] fp32
    indices: Optional[torch.Tensor]
    branch_out: Optional[torch.Tensor]  # [N_BRANCHES, B, T, HQ, DV] un-gated branch outputs, when saved
    kc: Optional[torch.Tensor]          # pooled compression keys [B, NC, HKV, DQK]
    vc: Optional[torch.Tensor]          # pooled compression values [B, NC, HKV, DV]


def compressed_blocks(desc, T: int) -> int:
    """Complete compression blocks of a sequence of T tokens (a partial block is never pooled)."""
    return max(0, (T - desc.cmp_block) // desc.cmp_stride + 1)


def pool(kernel, x, D: int, NC: int, weight=None, pe=None, *, heads_kv: int, bi: int, linear: bool, has_pe: bool,
         widen: bool, varlen=None, cmp_block: int = 0, cmp_stride: int = 0):
    """Pooled compression keys or values [B, NC, HKV, D] of `x` [B, T, HKV, D] (the module's `_pool_kernel`;
    `bi` blocks per program, from the plan). Packed (`varlen`, a runtime.varlen.Layout; x [1, total, HKV, D]):
    [1, NC, HKV, D] with NC the packed capacity (Layout.pooled), sequence i's blocks at rows cu_blocks[i] : ..."""
    B, T = x.shape[0], x.shape[1]
    out = torch.empty((B, NC, heads_kv, D), dtype=x.dtype, device=x.device)
    if NC == 0:
        return out
    BN = min(64, next_pow2(D))
    if varlen is None:
        grid = (_cdiv(NC, bi), B * heads_kv, _cdiv(D, BN))
        tables = (x, x, x)  # unused without VARLEN
    else:
        cu_blocks, _ = varlen.pooled(cmp_block, cmp_stride)
        table, n_programs = varlen.block_tiles(cmp_block, cmp_stride, bi)
        grid = (n_programs, heads_kv, _cdiv(D, BN))
        tables = (varlen.cu_seqlens, cu_blocks, table)
    if linear:
        kernel[grid](x, out, weight, pe if has_pe else weight, *tables, x.stride(0), x.stride(1), x.stride(2), T, NC,
                     D=D, BN=BN, BK=BN, BI=bi, LINEAR=True, HAS_PE=has_pe, WIDEN=widen, VARLEN=varlen is not None)
    else:
        kernel[grid](x, out, x, x, *tables, x.stride(0), x.stride(1), x.stride(2), T, NC,
                     D=D, BN=BN, BK=BN, BI=bi, LINEAR=False, HAS_PE=False, WIDEN=widen, VARLEN=varlen is not None)
    return out


class Forward:
    """One forward call's outputs and the arguments every attention kernel takes; `attention` launches the
    branches in the order the module calls it (the first writes, later ones add, the last writes `out`)."""

    def __init__(self, desc, configs: dict, candidates: dict, q, gates, out, save_branch_outputs: bool, widen: bool,
                 varlen=None):
        self.desc, self.configs, self.candidates, self.widen = desc, configs, candidates, widen
        # `save`: the kernels write the un-gated branch outputs (SAVE_BRANCH); `kept`: the state hands them to the
        # backward (`out` itself for one ungated branch: out_is_branch_output).
        self.kept = save_branch_outputs
        self.q, self.save = q, save_branch_outputs and not out_is_branch_output(desc)
        # A native packed call (docs/varlen.md): a runtime.varlen.Layout, the inputs a batch of one [1, total, ...]
        # (so B = 1, T = total below: every buffer is linear in the packed tokens) and the kernels launched with
        # VARLEN over the layout's tile tables. None: a batched call, launched exactly as before.
        self.varlen = varlen
        B, T = self.B, self.T = q.shape[0], q.shape[1]
        device = q.device
        hq, dv, nb = desc.heads_q, desc.dim_v, desc.n_branches
        self.out = out if out is not None else torch.empty((B, T, hq, dv), dtype=desc.dtype, device=device)
        self.branch_out = (torch.empty((nb, B, T, hq, dv), dtype=desc.dtype, device=device)
                           if self.save else self.out)
        self.lse = torch.empty((B, T, hq, nb), dtype=torch.float32, device=device)
        # Gated branch outputs are summed in fp32 here; the last branch's kernel writes the final dtype into `out`.
        self.acc = (torch.empty((B, T, hq, dv), dtype=torch.float32, device=device) if nb > 1 else self.out)
        # Without gates the kernels read no gate (zero strides over any tensor).
        self.gates, self.g_strides = (gates, strides(gates)) if desc.gated else (q, (0, 0, 0))
        self.launched = 0
        # The pointer arguments of the packed launches (unused without VARLEN: any tensor will do).
        self._no_tables = (q, q, q)

    def compressed_blocks(self) -> int:
        """Rows of the pooled keys/values per batch element: the complete compression blocks of T tokens, or, for a
        packed batch, the capacity of the packed pooled rows (runtime.varlen.Layout.pooled)."""
        d = self.desc
        if self.varlen is None:
            return compressed_blocks(d, self.T)
        return self.varlen.pooled(d.cmp_block, d.cmp_stride)[1]

    def pool(self, pool_fn, x, D: int, NC: int, *weights):
        """The module's `_pool(x, D, NC, ...)` on this call's layout (a chunked prefill's: the cache's pooled keys,
        then values, which its append pooled)."""
        d = self.desc
        if self.varlen is not None and self.varlen.prefill:
            self._pools = getattr(self, "_pools", -1) + 1
            return self.varlen.pooled_for(x, self._pools)
        return pool_fn(x, D, NC, *weights, varlen=self.varlen, cmp_block=d.cmp_block, cmp_stride=d.cmp_stride)

    def select_blocks(self, kernel, kc, indices, NC: int, *, bt: int, num_warps: int, num_stages: int = 3):
        """The compression scorer's top-n (the module's `_select_blocks_kernel`, `bt` queries per program), with the
        launch config `select` (num_warps, num_stages: Triton's default 3 unless the config says otherwise)."""
        d, q = self.desc, self.q
        if self.varlen is None:
            grid, tables = (_cdiv(self.T, bt), self.B * d.heads_kv), self._no_tables
        else:
            table, n_programs = self.varlen.token_tiles(bt)
            grid = (n_programs, d.heads_kv)
            tables = (self.varlen.seq_table, self.varlen.pooled(d.cmp_block, d.cmp_stride)[0], table)
        flags = self.varlen.flags if self.varlen is not None else {}
        kernel[grid](q, kc, self.lse, indices, *tables, *strides(q), self.T, NC, d.softmax_scale, WIDEN=self.widen,
                     VARLEN=self.varlen is not None, num_warps=num_warps, num_stages=num_stages, **flags)

    def new_indices(self):
        return torch.empty((self.B, self.T, self.desc.heads_kv, self.desc.top_k), dtype=torch.int32,
                           device=self.q.device)

    def attention(self, kernel, name: str, k, v, n_keys: int, indices=None, head_chunks: int = 1):
        """Launch branch `name`'s attention kernel over keys/values k, v (n_keys of them per sequence)."""
        d, q, T = self.desc, self.q, self.T
        first, last = self.launched == 0, self.launched == d.n_branches - 1
        self.launched += 1
        selection = () if indices is None else (indices,)
        meta = dict(HAS_PREV=not first, LAST=last, SAVE_BRANCH=self.save, WIDEN=self.widen)

        def args(tables):
            return (q, k, v, self.gates, self.acc, self.out, self.lse, self.branch_out, *selection, *tables,
                    *strides(q, k, v), *self.g_strides, T, n_keys, d.softmax_scale, self.B * T * d.heads_q * d.dim_v)

        if self.varlen is None:
            launch(kernel, name, self.configs, self.candidates,
                   lambda cfg: chunk_grid(cfg, _cdiv(T, cfg["bt"]), self.B * d.heads_kv, head_chunks),
                   args(self._no_tables), dict(meta, VARLEN=False), T=T,
                   restore=("ACC",) if not first and not last else ())
            return
        # Packed: the tuned (or default) config, whose query tile sizes the tile table (no autotuning here: the
        # table depends on the tile).
        cfg = launch_config(self.configs, name)
        table, n_programs = self.varlen.token_tiles(cfg["bt"])
        cu_blocks = (self.varlen.pooled(d.cmp_block, d.cmp_stride)[0] if name == "compression"
                     else self.varlen.cu_seqlens)
        tables = (self.varlen.seq_table_of(name), cu_blocks, table)
        launch_with(kernel, chunk_grid(cfg, n_programs, d.heads_kv, head_chunks), args(tables),
                    dict(meta, VARLEN=True, **self.varlen.flags), cfg)

    def selection_kv(self, kernel, merge_kernel, k, v, indices, *, unit: int, top_k: int, bq: int, warps: int,
                     merge_rows: int, forced=None, worklist: str = "torch"):
        """The selection branch in block-outer order (docs/selection_order.md): `kernel` attends each selected
        block to tiles of `bq` of the queries that chose it, writing per-(query, head, slot) log-sum-exps and
        normalised outputs; `merge_kernel` combines a row's slots and applies the branch epilogue. Queries go by
        chunks whose partial buffers fit KV_PARTIAL_BYTES (one chunk unless B * T is large).

        `forced` (the plan's sel_kv_forced, for a selection the forward's own scorer made, batched calls):
        (kernel, initial, local, warps): the forced blocks leave the work list and `kernel` attends them per tile of
        `bq` queries before merging the other slots, in place of `merge_kernel`. `worklist`: the work list's form
        (runtime.selection.WORKLIST_FORMS; the plan's sel_kv_worklist), the same list either way."""
        d, q, B, T = self.desc, self.q, self.B, self.T
        first, last = self.launched == 0, self.launched == d.n_branches - 1
        self.launched += 1
        per_query = d.heads_q * top_k * (d.dim_v * d.dtype.itemsize + 4)
        lay = self.varlen
        if lay is not None:
            # Packed: queries are packed rows (B = 1, T = total; the merge below needs nothing else), units are
            # numbered over the batch so a block is never shared across sequences. (No forced-merge variant.)
            forced = None
            cu_units, unit_seq, n_batch_units = lay.units(unit)
        for t0, t1 in _selection.query_chunks(B, T, per_query, KV_PARTIAL_BYTES):
            TC = t1 - t0
            if lay is None:
                qpos, slot, item_seg, item_start, item_end, n_items = _selection.kv_order_worklist(
                    indices[:, t0:t1], T, unit=unit, tile_queries=bq,
                    skip_forced=None if forced is None else (t0, *forced[1:3]), form=worklist)
                tables = self._no_tables
            else:
                qpos, slot, item_seg, item_start, item_end, n_items = _selection.kv_order_segments_packed(
                    indices[:, t0:t1], lay.seq_of_token[t0:t1], cu_units, n_batch_units, tile_queries=bq,
                    form=worklist)[:6]
                tables = (lay.seq_table, cu_units, unit_seq)
            if n_items == 0 and forced is None:
                continue
            part_o = torch.empty((B, TC, d.heads_q, top_k, d.dim_v), dtype=d.dtype, device=q.device)
            part_lse = torch.empty((B, TC, d.heads_q, top_k), dtype=torch.float32, device=q.device)
            kernel[(n_items,)](q, k, v, part_o, part_lse, qpos, slot, item_seg, item_start, item_end, *tables,
                               *strides(q, k, v), T, t0, TC, d.softmax_scale, WIDEN=self.widen,
                               VARLEN=lay is not None, num_warps=warps, num_stages=1, **(lay.flags if lay else {}))
            if forced is not None:
                forced[0][(_cdiv(TC, bq), B * d.heads_kv)](
                    q, k, v, part_o, part_lse, indices, self.gates, self.acc, self.out, self.lse, self.branch_out,
                    *strides(q, k, v), *self.g_strides, T, t0, TC, d.softmax_scale,
                    B * T * d.heads_q * d.dim_v, HAS_PREV=not first, LAST=last, SAVE_BRANCH=self.save,
                    WIDEN=self.widen, num_warps=forced[3], num_stages=2)
                continue
            n_rows = B * TC * d.heads_q
            merge_kernel[(_cdiv(n_rows, merge_rows),)](
                part_o, part_lse, indices, self.gates, self.acc, self.out, self.lse, self.branch_out,
                *self.g_strides, T, t0, TC, n_rows, B * T * d.heads_q * d.dim_v, HAS_PREV=not first, LAST=last,
                SAVE_BRANCH=self.save)

    def state(self, indices, kc, vc) -> ForwardState:
        return ForwardState(self.out, self.lse, indices, self.branch_out if self.kept else None, kc, vc)


class Backward:
    """One backward call's accumulators and the arguments every backward kernel takes. dQ is summed over the
    branches in fp32, or, with one branch, written once in the spec's dtype (dq_dtype); dK/dV per k/v input (the
    first kernel to reach one writes it, later ones add; each element has one writer per launch, and launches run
    in order). `branch_out`: the forward's un-gated branch outputs [N_BRANCHES, B, T, HQ, DV], or, for one ungated
    branch, its `out` [B, T, HQ, DV] (the same layout).

    A native packed call (`varlen`, a runtime.varlen.Layout) is the forward's: the saved state and inputs are a
    batch of one [1, total, ...] (every accumulator linear in total), and each kernel runs with VARLEN over the
    layout's tile tables, with its tuned or default config (no autotuning: the tables depend on the tiles)."""

    def __init__(self, desc, configs: dict, candidates: dict, preprocess_kernel, dout, q, gates, lse, branch_out,
                 widen: bool, varlen=None):
        self.desc, self.configs, self.candidates, self.widen = desc, configs, candidates, widen
        self.varlen = varlen
        B, T = self.B, self.T = q.shape[0], q.shape[1]
        device = self.device = q.device
        hq, nb = desc.heads_q, desc.n_branches
        self.q, self.lse = q, lse
        self.dout = dout.to(desc.dtype).contiguous()
        self.gates, self.g_strides = (gates, strides(gates)) if desc.gated else (q, (0, 0, 0))
        n_rows = B * T * hq
        self.dg = torch.empty((B, T, hq, nb), dtype=torch.float32, device=device)
        self.dgates = torch.empty((B, T, hq, nb), dtype=desc.dtype, device=device)
        cfg = launch_config(configs, "preprocess")
        preprocess_kernel[(_cdiv(n_rows, cfg["rows"]),)](self.dout, branch_out, self.dg, self.dgates, n_rows,
                                                         BR=cfg["rows"], num_warps=cfg["num_warps"])
        # dQ: fp32 summed over branches, or the gradient itself in the spec's dtype with one branch (dq_dtype).
        self.dq_acc = torch.empty((B, T, hq, desc.dim_qk), dtype=dq_dtype(desc), device=device)
        self.grads: dict = {}
        self.launched = 0
        self._no_tables = (q, q, q)  # the packed launches' pointer arguments, unused without VARLEN
        self.distill_p = self._p_parts = None  # selection(distill_p=...): where the selection's P goes

    def _p_out(self, chunks: int, atomic: bool = False) -> tuple:
        """(P_OUT, P_CHUNK, STORE_P) of a selection launch of `chunks` programs a query and kv head that emits the
        distillation's target p into `distill_p` (docs/distill.md, "Sharing the attention backward's
        probabilities"): the buffer itself for one program; else, `atomic` (the scatter kernel, order-dependent
        anyway), the buffer zeroed for the chunks' atomic adds (STORE_P 2); else a scratch
        [chunks, *distill_p.shape] of each chunk's share, which `_p_done` sums into it in chunk order
        (deterministic); placeholders without distill_p."""
        p = self.distill_p
        if p is None:
            return self.q, 0, 0
        if chunks == 1:
            return p, 0, 1
        if atomic:
            return p.zero_(), 0, 2
        self._p_parts = torch.empty((chunks,) + tuple(p.shape), dtype=torch.float32, device=self.device)
        return self._p_parts, p.numel(), 1

    def _p_done(self) -> None:
        if self._p_parts is not None:
            torch.sum(self._p_parts, dim=0, out=self.distill_p)
            self._p_parts = None

    def target(self, name: str, D: int, zero: bool = False):
        """The fp32 gradient accumulator of input `name` [B, T, HKV, D], and whether a kernel must add into it
        (`zero`: made zeroed, for a kernel that only ever adds into it)."""
        first = name not in self.grads
        if first:
            self.grads[name] = (torch.zeros if zero else torch.empty)((self.B, self.T, self.desc.heads_kv, D),
                                                                      dtype=torch.float32, device=self.device)
        return self.grads[name], not first

    def _common(self, k, v, n_keys: int) -> tuple:
        return (*strides(self.q, k, v), *self.g_strides, self.T, n_keys, self.desc.softmax_scale)

    def _packed_launch(self, kernel, name: str, tiles, grid_rest: tuple, args, meta: dict):
        """Launch `kernel` over a packed batch: `tiles(cfg)` gives (tables, programs) for its config, `args(tables)`
        its arguments."""
        cfg = launch_config(self.configs, name)
        tables, n_programs = tiles(cfg)
        launch_with(kernel, (n_programs,) + grid_rest, args(tables), dict(meta, VARLEN=True), cfg)

    def _query_tiles(self, name: str, bt: int):
        """(cu_seqlens, key offsets, table), programs: a packed launch over query tiles of `bt` positions; the key
        offsets are the pooled blocks' for the compression branch."""
        lay, d = self.varlen, self.desc
        table, n_programs = lay.token_tiles(bt)
        keys = lay.pooled(d.cmp_block, d.cmp_stride)[0] if name == "compression" else lay.cu_seqlens
        return (lay.cu_seqlens, keys, table), n_programs

    def dq(self, kernel, name: str, k, v, n_keys: int, indices=None, head_chunks: int = 1, emits_p: bool = False):
        """Launch branch `name`'s dQ kernel (the selection's: one query position per program, the group's heads
        over `head_chunks` programs; `emits_p`: a kernel with STORE_P, the scatter path's deterministic one)."""
        d, T, first = self.desc, self.T, self.launched == 0
        self.launched += 1
        per_position = indices is not None
        selection, tail, store = () if indices is None else (indices,), (), {}
        if emits_p:
            p_out, p_chunk, store_p = self._p_out(head_chunks)
            selection, tail, store = selection + (p_out,), (p_chunk,), {"STORE_P": store_p}

        def args(tables):
            return (self.q, k, v, self.gates, self.dout, self.lse, self.dg, self.dq_acc, *selection, *tables,
                    *self._common(k, v, n_keys), *tail)

        meta = dict(HAS_PREV=not first, WIDEN=self.widen, **store)
        if self.varlen is not None:
            self._packed_launch(kernel, f"{name}_dq",
                                lambda cfg: self._query_tiles(name, 1 if per_position else cfg["bt"]),
                                (d.heads_kv * head_chunks,), args, meta)
            return
        launch(kernel, f"{name}_dq", self.configs, self.candidates,
               lambda cfg: (T if per_position else _cdiv(T, cfg["bt"]), self.B * d.heads_kv * head_chunks),
               args(self._no_tables), dict(meta, VARLEN=False), T=T, restore=() if first else ("DQ",))

    def compression_dkdv(self, kernel, kc, vc, NC: int):
        """dKc, dVc [B, NC, HKV, D] (fp32) of the pooled keys/values. The queries that see a pooled key run to T:
        cut into splits (grid axis 2) for parallelism, whose partial sums are added in a fixed order
        (deterministic)."""
        d, B, T, lay = self.desc, self.B, self.T, self.varlen
        cfg = launch_config(self.configs, "compression_dkdv")
        # Packed: splits of the longest sequence (a shorter one's splits past its end write zeros).
        longest = T if lay is None else lay.max_seqlen
        n_split = max(1, min(cfg["max_splits"], _cdiv(longest, cfg["split"])))
        q_split = _cdiv(_cdiv(longest, n_split), cfg["bt"]) * cfg["bt"]
        # Packed, the rows past the batch's pooled blocks (NC is the capacity) are written by no program: zeros
        # keep every sum over the rows exact (the position embedding's gradient sums all of them).
        alloc = torch.empty if lay is None else torch.zeros
        dkc = alloc((n_split, B, NC, d.heads_kv, d.dim_qk), dtype=torch.float32, device=self.device)
        dvc = alloc((n_split, B, NC, d.heads_kv, d.dim_v), dtype=torch.float32, device=self.device)

        def args(tables):
            return (self.q, kc, vc, self.gates, self.dout, self.lse, self.dg, dkc, dvc, *tables,
                    *self._common(kc, vc, NC), q_split, dkc[0].numel(), dvc[0].numel())

        meta = dict(ACCUMULATE=False, WIDEN=self.widen)
        if NC > 0 and lay is None:
            launch(kernel, "compression_dkdv", self.configs, self.candidates,
                   lambda cfg: (_cdiv(NC, cfg["block_n"]), B * d.heads_kv, n_split), args(self._no_tables),
                   dict(meta, VARLEN=False), T=T)
        elif NC > 0:
            cu_blocks = lay.pooled(d.cmp_block, d.cmp_stride)[0]

            def tiles(cfg):
                table, n_programs = lay.block_tiles(d.cmp_block, d.cmp_stride, cfg["block_n"])
                return (lay.cu_seqlens, cu_blocks, table), n_programs

            self._packed_launch(kernel, "compression_dkdv", tiles, (d.heads_kv, n_split), args, meta)
        return (dkc.sum(dim=0) if n_split > 1 else dkc[0]), (dvc.sum(dim=0) if n_split > 1 else dvc[0])

    def _targets(self, k_name: str, v_name: str):
        dk, accumulate = self.target(k_name, self.desc.dim_qk)
        dv, accumulate_v = self.target(v_name, self.desc.dim_v)
        assert accumulate == accumulate_v
        return dk, dv, accumulate

    def window_dkdv(self, kernel, k_name: str, v_name: str, k, v):
        """dK, dV of the window branch's keys/values (each program owns a key tile and its window of queries)."""
        dk, dv, accumulate = self._targets(k_name, v_name)
        T = self.T

        def args(tables):
            return (self.q, k, v, self.gates, self.dout, self.lse, self.dg, dk, dv, *tables, *self._common(k, v, T),
                    T, 0, 0)

        meta = dict(ACCUMULATE=accumulate, WIDEN=self.widen)
        if self.varlen is not None:
            self._packed_launch(kernel, "window_dkdv", lambda cfg: self._query_tiles("window", cfg["block_n"]),
                                (self.desc.heads_kv, 1), args, meta)
            return
        launch(kernel, "window_dkdv", self.configs, self.candidates,
               lambda cfg: (_cdiv(T, cfg["block_n"]), self.B * self.desc.heads_kv, 1), args(self._no_tables),
               dict(meta, VARLEN=False), T=T, restore=("DK", "DVAL") if accumulate else ())

    def selection_dkdv(self, kernel, k_name: str, v_name: str, k, v, indices, inverse_index, max_entries: int):
        """dK, dV of the selection branch's keys/values through the selection's inverse index
        (`inverse_index(indices, T, tile)`). The index sorts B * T * HKV * k entries with several int64
        temporaries: built and used for a group of batch elements at a time, at most `max_entries` entries unless
        one element alone has more (views: the kernel's batch index is relative), so a padded varlen batch or a
        large B costs what one group costs. Packed: by groups of packed query rows instead (a long sequence may
        alone exceed the budget); each group's launch adds into the dK/dV of the groups before it."""
        d, B, T = self.desc, self.B, self.T
        dk, dv, accumulate = self._targets(k_name, v_name)
        cfg = launch_config(self.configs, "selection_dkdv")
        q, g, dout, lse, dg = self.q, self.gates, self.dout, self.lse, self.dg
        lay = self.varlen
        if lay is not None:
            table, n_programs = lay.token_tiles(cfg["block_n"])
            rows = max(1, max_entries // (d.heads_kv * d.top_k))
            for r0 in range(0, T, rows):
                offsets, qpos, bits = inverse_index(indices[:, r0:r0 + rows], T, cfg["block_n"], varlen=(lay, r0))
                launch_with(kernel, (n_programs, d.heads_kv),
                            (q, k, v, g, dout, lse, dg, dk, dv, offsets, qpos, bits, lay.cu_seqlens, table,
                             *self._common(k, v, T)),
                            dict(ACCUMULATE=accumulate or r0 > 0, WIDEN=self.widen, VARLEN=True), cfg)
            return
        group = max(1, max_entries // (T * d.heads_kv * d.top_k))
        for b0 in range(0, B, group):
            bs = slice(b0, min(B, b0 + group))
            offsets, qpos, bits = inverse_index(indices[bs], T, cfg["block_n"])
            launch(kernel, "selection_dkdv", self.configs, self.candidates,
                   lambda cfg: (_cdiv(T, cfg["block_n"]), (bs.stop - b0) * d.heads_kv),
                   (q[bs], k[bs], v[bs], g[bs], dout[bs], lse[bs], dg[bs], dk[bs], dv[bs], offsets, qpos, bits,
                    q, q, *self._common(k, v, T)),
                   dict(ACCUMULATE=accumulate, WIDEN=self.widen, VARLEN=False), T=T,
                   restore=("DK", "DVAL") if accumulate else ())

    def selection(self, scatter_kernel, dq_kernel, dkdv_kernel, k_name: str, v_name: str, k, v, indices,
                  inverse_index, max_entries: int, *, dq_chunks: int, scatter_chunks: int, dkdv_once_kernel=None,
                  distill_p=None):
        """The selection branch's backward where the plan chose the scatter path (docs/backward.md): the scatter
        kernel (with its split form's dK/dV kernel, `dkdv_once_kernel`, when the launch config asks for it), or,
        when PyTorch's deterministic mode is on (torch.use_deterministic_algorithms), the deterministic pair, the
        dq kernel and the inverse-index dK/dV kernel. `distill_p` (fp32 [B, T, HKV, top_k], checked by
        runtime.autograd): filled with the distillation's target p, the mean over each kv group's heads of the
        softmax at every selected slot (0 at padding slots), by whichever kernel computes P per query."""
        self.distill_p = distill_p
        if torch.are_deterministic_algorithms_enabled():
            self.dq(dq_kernel, "selection", k, v, self.T, indices, head_chunks=dq_chunks, emits_p=True)
            self.selection_dkdv(dkdv_kernel, k_name, v_name, k, v, indices, inverse_index, max_entries)
        else:
            self.selection_scatter(scatter_kernel, k_name, v_name, k, v, indices, head_chunks=scatter_chunks,
                                   dkdv_once_kernel=dkdv_once_kernel)
        self._p_done()

    def selection_scatter(self, kernel, k_name: str, v_name: str, k, v, indices, *, head_chunks: int,
                          dkdv_once_kernel=None):
        """dQ, dK and dV of the selection branch in one query-outer kernel (one program per query, kv head and
        chunk of heads): dQ written like the dq kernel's, dK/dV added into zeroed fp32 accumulators with atomics
        (order-dependent sums). With MLA the kernel adds dV into dK itself, so no dV accumulator is made.

        The split form (launch config `dkdv_once` 1; docs/backward.md, "Fewer atomics"): the scatter
        kernel computes dQ only (DKDV 0), then `dkdv_once_kernel`, one program per (query, kv head) over all the
        group's heads, adds each selected (query, key)'s dK/dV once; its tile is the config's `dkdv_*` fields."""
        d, T = self.desc, self.T
        first = self.launched == 0
        self.launched += 1
        dk, acc_k = self.target(k_name, d.dim_qk, zero=True)
        dv = dk if d.mla else self.target(v_name, d.dim_v, zero=True)[0]

        def chunks(cfg: dict) -> int:
            # Programs per (query, kv head): the launch config's head rows (`gp`), else the plan's head chunks.
            return _cdiv(d.heads_q // d.heads_kv, cfg["gp"]) if cfg.get("gp") else head_chunks

        cfg = launch_config(self.configs, "selection_scatter")
        # P (distill_p): from the split form's dK/dV kernel (all the group's heads), else from the scatter kernel's
        # head chunks of this config (so never autotuned: the chunks must be known before the launch).
        p_out, p_chunk, store_p = self._p_out(1 if cfg.get("dkdv_once") else chunks(cfg), atomic=True)

        def args(tables):
            return (self.q, k, v, self.gates, self.dout, self.lse, self.dg, self.dq_acc, dk, dv, indices, p_out,
                    *tables, *self._common(k, v, T), p_chunk)

        meta = dict(HAS_PREV=not first, WIDEN=self.widen)
        if cfg.get("dkdv_once"):
            self._scatter_split(kernel, dkdv_once_kernel, cfg, chunks(cfg), args, meta, k, v, indices, dk, dv,
                                (p_out, store_p))
            return
        if store_p:
            meta["STORE_P"] = store_p
        if self.varlen is not None:
            tables, n_programs = self._query_tiles("selection", 1)
            launch_with(kernel, chunk_grid(cfg, n_programs, d.heads_kv, chunks(cfg)), args(tables),
                        dict(meta, VARLEN=True), cfg)
        elif store_p:
            launch_with(kernel, chunk_grid(cfg, T, self.B * d.heads_kv, chunks(cfg)), args(self._no_tables),
                        dict(meta, VARLEN=False), cfg)
        else:
            launch(kernel, "selection_scatter", self.configs, self.candidates,
                   lambda cfg: chunk_grid(cfg, T, self.B * d.heads_kv, chunks(cfg)), args(self._no_tables),
                   dict(meta, VARLEN=False), T=T, restore=("DQ", "DK", "DVAL"))

    def _scatter_split(self, kernel, once_kernel, cfg: dict, chunks: int, args, meta: dict, k, v, indices, dk, dv,
                       p_out):
        """The scatter path's split form: dQ by the scatter kernel (DKDV 0, the config's tile), then dK/dV by
        `once_kernel` (one program per query and kv head, the config's `dkdv_*` tile), on the same grid rows;
        `p_out` (P_OUT, STORE_P) the latter's."""
        d, T = self.desc, self.T
        if once_kernel is None:
            raise RuntimeError("the launch config of selection_scatter asks for the split form (dkdv_once) but this "
                               "module has no dK/dV kernel for it: rebuild the module (specgen build)")
        once_cfg = {"block_n": cfg["dkdv_block_n"], "num_warps": cfg["dkdv_warps"], "num_stages": cfg["dkdv_stages"]}
        if self.varlen is not None:
            tables, n_programs = self._query_tiles("selection", 1)
            grid, varlen = (n_programs, d.heads_kv), True
        else:
            tables, grid, varlen = self._no_tables, (T, self.B * d.heads_kv), False
        launch_with(kernel, chunk_grid(cfg, *grid, chunks), args(tables), dict(meta, DKDV=0, VARLEN=varlen), cfg)
        once_args = (self.q, k, v, self.gates, self.dout, self.lse, self.dg, dk, dv, indices, p_out[0], *tables,
                     *self._common(k, v, T))
        store = {"STORE_P": 1} if p_out[1] else {}
        launch_with(once_kernel, grid, once_args, dict(WIDEN=self.widen, VARLEN=varlen, **store), once_cfg)

    def selection_kv(self, kernel, dq_reduce_kernel, dkdv_reduce_kernel, k_name: str, v_name: str, k, v, indices, *,
                     unit: int, top_k: int, split: int, block_n: int, merge_rows: int, worklist: str = "torch"):
        """The selection branch's backward in block-outer order (docs/selection_order.md): `kernel` computes, per
        work item (one selected block, at most `split` of the queries that chose it), the item's dK/dV partials and
        each (query, head)'s dQ share at the block's slot; the reduce kernels sum the partials per block in item
        order and the shares per row in slot order (deterministic, no atomics). Queries go by chunks whose dQ
        shares fit KV_PARTIAL_BYTES; each chunk's dK/dV is added to the previous chunks' in chunk order. Packed:
        the forward's work list of the batch's units (no block shared across sequences), queries packed rows.
        `worklist`: the work list's form, as the forward's."""
        d, B, T, lay = self.desc, self.B, self.T, self.varlen
        first = self.launched == 0
        self.launched += 1
        dk, dv, accumulate = self._targets(k_name, v_name)
        device = self.device
        per_query = d.heads_q * top_k * d.dim_qk * d.dtype.itemsize
        if lay is not None:
            cu_units, unit_seq, n_batch_units = lay.units(unit)
            tables = (lay.cu_seqlens, cu_units, unit_seq)
        else:
            tables = self._no_tables
        for t0, t1 in _selection.query_chunks(B, T, per_query, KV_PARTIAL_BYTES):
            TC = t1 - t0
            if lay is None:
                work = _selection.kv_order_segments(indices[:, t0:t1], T, unit=unit, tile_queries=split,
                                                    form=worklist)
            else:
                work = _selection.kv_order_segments_packed(indices[:, t0:t1], lay.seq_of_token[t0:t1], cu_units,
                                                           n_batch_units, tile_queries=split, form=worklist)
            qpos, slot, item_seg, item_start, item_end, n_items, seg_first, seg_items = work
            if n_items == 0:
                continue
            dq_part = torch.empty((B, TC, d.heads_q, top_k, d.dim_qk), dtype=d.dtype, device=device)
            part_dk = torch.empty((n_items, block_n, d.dim_qk), dtype=torch.float32, device=device)
            part_dv = torch.empty((n_items, block_n, d.dim_v), dtype=torch.float32, device=device)
            # The launch config `selection_kv_bwd` (rows per trip, product form, warps, stages; the grid is the
            # work list's): tuned, autotuned or the plan's default, as the other backward kernels'.
            launch(kernel, "selection_kv_bwd", self.configs, self.candidates, lambda cfg, n=n_items: (n,),
                   (self.q, k, v, self.gates, self.dout, self.lse, self.dg, dq_part, part_dk, part_dv, qpos, slot,
                    item_seg, item_start, item_end, *tables, *strides(self.q, k, v), *self.g_strides, T, t0, TC,
                    d.softmax_scale), dict(WIDEN=self.widen, VARLEN=lay is not None), T=T)
            n_rows = B * TC * d.heads_q
            dq_reduce_kernel[(_cdiv(n_rows, merge_rows),)](dq_part, indices, self.dq_acc, T, t0, TC, n_rows,
                                                           HAS_PREV=not first)
            dkdv_reduce_kernel[(seg_first.numel(),)](part_dk, part_dv, seg_first, seg_items, dk, dv, *tables, T,
                                                     d.softmax_scale, ACCUMULATE=accumulate or t0 > 0,
                                                     VARLEN=lay is not None, num_warps=4)

    def gradients(self, names: tuple, **pool_grads) -> tuple:
        """The gradients of `names` (the differentiable inputs, q first) in the spec's dtype; `pool_grads` those
        of the linear pool's weights, computed by the module."""
        d = self.desc
        if d.mla and "v" in self.grads:
            # MLA: V is the first d_v dims of K, so V's gradient is added into K's (the scatter kernel did it).
            self.grads["k"][..., :d.dim_v] += self.grads.pop("v")
        # Written in the spec's dtype only by a single dQ writer (one branch; .to() then returns it as it is).
        assert self.dq_acc.dtype == torch.float32 or self.launched <= 1, "dQ in the spec's dtype has one writer"
        out = [self.dq_acc.to(d.dtype)]
        for name in names[1:]:
            if name == "gates":
                out.append(self.dgates)
            elif name in pool_grads:
                out.append(pool_grads[name])
            else:
                out.append(self.grads[name].to(d.dtype))
        return tuple(out)


def pool_backward(kernels: dict, configs: dict, dkc, x, D: int, NC: int, dx, accumulate: bool, weight=None, pe=None,
                  *, heads_kv: int, cmp_block: int, cmp_stride: int, varlen=None):
    """Gradient of the pooling: adds (or writes) dX into the fp32 `dx` [B, T, HKV, D]; with a linear pool (the
    module's `_pool_bwd_linear_dx_kernel` and `_pool_bwd_dw_kernel` in `kernels`), returns (dW, dpe), else
    `_pool_bwd_mean_kernel` and (None, None). Packed (`varlen`, a runtime.varlen.Layout; x [1, total, HKV, D],
    dkc the packed pooled rows of runtime.launches.pool): the dX kernels walk token tiles of each sequence and the
    dW kernel reduces over the sequences."""
    B, T = x.shape[0], x.shape[1]
    cfg = launch_config(configs, "pool")
    BN = min(64, next_pow2(D))
    packed = varlen is not None

    def tiles(tokens: int):
        """Grid axis 0 and the tables of a launch over token tiles (batch x kv heads on axis 1 when not packed)."""
        if not packed:
            return (_cdiv(T, tokens), B * heads_kv), (x, x, x)
        table, n_programs = varlen.token_tiles(tokens)
        return (n_programs, heads_kv), (varlen.cu_seqlens, varlen.pooled(cmp_block, cmp_stride)[0], table)

    if "mean" in kernels:
        grid, tables = tiles(cfg["tokens"])
        kernels["mean"][grid + (_cdiv(D, BN),)](dkc, dx, T, NC, *tables, D=D, BS=cfg["tokens"], BN=BN,
                                                ACCUMULATE=accumulate, VARLEN=packed, num_warps=cfg["num_warps"])
        return None, None
    grid, tables = tiles(cfg["chunks"] * cmp_stride)
    kernels["dx"][grid + (cmp_stride * _cdiv(D, BN),)](dkc, weight, dx, T, NC, *tables, D=D, BM=cfg["chunks"], BA=BN,
                                                       BE=BN, ACCUMULATE=accumulate, VARLEN=packed,
                                                       num_warps=cfg["num_warps"])
    dw = torch.empty(weight.shape, dtype=torch.float32, device=x.device)
    grid = (cmp_block * _cdiv(D, BN), heads_kv, _cdiv(D, BN))
    n_seq = varlen.n if packed else B
    kernels["dw"][grid](x, x if pe is None else pe, dkc, dw, *tables[:2], x.stride(0), x.stride(1), x.stride(2), n_seq,
                        T, NC, D=D, BI=cfg["blocks"], BA=BN, BE=BN, HAS_PE=pe is not None, VARLEN=packed,
                        num_warps=cfg["num_warps"])
    dpe = None
    if pe is not None:
        # dpe[r] = sum over (b, i, g) of dKc[b, i, g] @ W[g, r]^T = sum over g of (sum over b, i of dKc) @ W[g, r]^T.
        w = weight.to(torch.float32).view(heads_kv, cmp_block, D, D)
        dpe = torch.einsum("ge,grae->ra", dkc.sum(dim=(0, 1)), w).to(pe.dtype)
    return dw.to(weight.dtype), dpe
