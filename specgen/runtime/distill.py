"""Host code of the indexer distillation loss (docs/distill.md): argument checks, the packed (varlen) path, the
stage logic and the custom op's autograd glue, parametrised by the module's descriptor, and the launches of the
kernels (`Launches`); the generated module keeps the kernels and registers the custom ops (`fwd`, `bwd`), whose
bodies call `Launches`."""

from __future__ import annotations

from typing import Optional

import torch

from . import ArgumentError, cdiv as _cdiv, check_indices, check_seqlen, check_tensor, check_varlen, packed_map

INPUTS = ("q", "k", "q_idx", "k_idx", "w_idx")


def inverse_index(indices, heads_kv: int, layout=None):
    """CSR of the selection transposed, built with a stable sort (deterministic): (ptr int64 [B*heads_kv*T + 1],
    pos int64 [B*T*heads_kv*k]). pos lists the flat positions of the valid pairs (0 <= s <= t) sorted by (b, g, s)
    then t, invalid ones last; key s of (b, g) owns pos[ptr[(b*heads_kv + g)*T + s] : ptr[... + 1]].

    Packed (`layout`, a runtime.varlen.Layout; indices [1, total, heads_kv, k], relative to each sequence's start):
    per sequence, t and s are positions in the row's own sequence, and the key is the packed row bos + s, so packed
    key row r of group g owns pos[ptr[g*total + r] : ptr[g*total + r + 1]]; a pair never reaches another
    sequence. Memory linear in the batch's tokens."""
    B, T = indices.shape[0], indices.shape[1]
    idx = indices.to(torch.int64, copy=True)
    device = indices.device
    t = torch.arange(T, device=device).view(1, T, 1, 1)
    base = torch.zeros((), dtype=torch.long, device=device)
    if layout is not None:
        bos = layout.cu_seqlens.long()[layout.seq_of_token].view(1, T, 1, 1)
        t, base = t - bos, bos
    valid = (idx >= 0) & (idx <= t)
    bg = (torch.arange(B, device=device).view(B, 1, 1, 1) * heads_kv
          + torch.arange(heads_kv, device=device).view(1, 1, heads_kv, 1))
    n_keys = B * heads_kv * T
    # In place: the keys are the one int64 buffer besides the sort's (V3.2 at 64k: 1 GiB each).
    key = idx.add_(bg * T + base).masked_fill_(~valid, n_keys).flatten()
    del valid, idx
    key, pos = torch.sort(key, stable=True)
    ptr = torch.searchsorted(key, torch.arange(n_keys + 1, device=device))
    return ptr, pos


def _strides(q, k, q_idx, k_idx, w_idx) -> tuple:
    return (q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
            q_idx.stride(0), q_idx.stride(1), q_idx.stride(2), k_idx.stride(0), k_idx.stride(1), k_idx.stride(2),
            w_idx.stride(0), w_idx.stride(1))


PATHS = ("fused", "legacy")
# The sparse fused forward's forms (the kernel's FORM constexpr; docs/distill.md, "The sparse forward's forms").
FWD_FORMS = ("base", "pf", "km", "km_pf")
# The dense fused forward's forms (docs/distill.md, "The dense forward's forms"): "base" launches
# _distill_fwd_dense_fused_kernel, the others _distill_fwd_dense_qreg_kernel with the module's constexprs for the
# form (Launches' dense_forms: keys a trip BK, pipeline stages STAGES, Q's pieces kept in shared memory QSMEM).
DENSE_FWD_FORMS = ("base", "qreg", "qreg_k32")
# The dense backward's query side in the same forms: "base" launches _distill_dq_dense_fused_kernel, "qreg"
# _distill_dq_dense_qreg_kernel with the form's constexprs (qreg_k32's tiling makes ptxas serialise its products).
DENSE_DQ_FORMS = ("base", "qreg")


class Launches:
    """The distillation kernels' launches of one module: `kernels` maps fwd_dense, fwd_sparse, dq_dense, dk_dense,
    dq_sparse, dk_sparse (the legacy path) and fwd_dense_fused, dq_dense_fused, dk_dense_fused, fwd_sparse_fused,
    bwd_sparse_fused (the fused path) and fwd_dense_qreg, dq_dense_qreg (the dense register-operand forms) and
    fwd_dense_mha, di_dense_mha, dq_dense_mha, dk_dense_mha (the dense stage from unabsorbed q and k, on modules whose
    spec has `unabsorbed`: `mha` holds their tiles, see `unabsorbed`) to the
    module's `_distill_<name>_kernel`; the tiles (bt query positions per
    dense program, bk / sbk keys per dense / sparse dK program), warps and stages are the plan's (`fused`: the fused
    path's bk, num_warps and bwd_warps).

    `path` ("fused" or "legacy", docs/distill.md "Two paths") is a launch config: set it on the module's
    `_DISTILL_LAUNCHES` to time one against the other; so are `fwd_form`, the fused sparse forward's form, and
    `dense_fwd_form`, the fused dense forward's (DENSE_FWD_FORMS, those the module renders: `dense_forms` maps each
    register-operand form to its launch constexprs), and `dense_dq_form`, the fused dense backward's query side
    (DENSE_DQ_FORMS). The sparse backward follows the forward that ran
    (the fused one needs the p it stored) and takes the deterministic legacy kernels under
    torch.use_deterministic_algorithms."""

    def __init__(self, kernels: dict, inverse_index, *, heads_q: int, heads_kv: int, top_k: int, bt: int, bk: int,
                 sbk: int, sm_scale: float, idx_scale: float, widen: bool, num_warps: int, num_stages=None,
                 fused: dict | None = None, path: str = "legacy", fwd_form: str = "base",
                 dense_fwd_form: str = "base", dense_forms: dict | None = None, dense_dq_form: str = "base",
                 mha: dict | None = None):
        self.kernels, self.inverse_index = kernels, inverse_index
        self.heads_q, self.heads_kv, self.top_k, self.bt, self.bk, self.sbk = heads_q, heads_kv, top_k, bt, bk, sbk
        self.scales = (sm_scale, idx_scale)
        self.widen = widen
        stages = {"num_stages": num_stages} if num_stages else {}
        self.options = {"num_warps": num_warps, **stages}
        fused = fused or {"bk": bk, "num_warps": num_warps, "bwd_warps": num_warps}
        self.fused_bk = fused["bk"]
        self.fused_options = {"num_warps": fused["num_warps"], **stages}
        self.bwd_options = {"num_warps": fused["bwd_warps"]}
        self.path = path
        self.fwd_form = fwd_form
        self.dense_forms = dict(dense_forms or {})
        self.dense_fwd_form = dense_fwd_form
        self.dense_dq_form = dense_dq_form
        self.mha = dict(mha) if mha else None

    def unabsorbed(self, k) -> bool:
        """Whether `k` holds a key per query head of the unabsorbed dims (mha["qk"]): the dense stage's other form
        (the spec refuses dims that would make it the absorbed form's shape). Distill.loss has checked the shapes."""
        return self.mha is not None and tuple(k.shape[-2:]) == (self.heads_q, self.mha["qk"])

    @property
    def fwd_form(self) -> str:
        """The sparse fused forward's form (FWD_FORMS), a launch config like `path`."""
        return self._fwd_form

    @fwd_form.setter
    def fwd_form(self, value: str) -> None:
        if value not in FWD_FORMS:
            raise ArgumentError(f"distillation launches: `fwd_form` must be one of {FWD_FORMS}, got {value!r}")
        self._fwd_form = value

    @property
    def dense_fwd_form(self) -> str:
        """The dense fused forward's form (DENSE_FWD_FORMS), a launch config like `path`."""
        return self._dense_fwd_form

    @dense_fwd_form.setter
    def dense_fwd_form(self, value: str) -> None:
        self._dense_fwd_form = self._dense_form("dense_fwd_form", DENSE_FWD_FORMS, value)

    @property
    def dense_dq_form(self) -> str:
        """The fused dense backward's query-side form (DENSE_DQ_FORMS), a launch config like `path`."""
        return self._dense_dq_form

    @dense_dq_form.setter
    def dense_dq_form(self, value: str) -> None:
        self._dense_dq_form = self._dense_form("dense_dq_form", DENSE_DQ_FORMS, value)

    def _dense_form(self, what: str, forms: tuple, value: str) -> str:
        known = tuple(f for f in forms if f == "base" or f in self.dense_forms)
        if value not in known:
            raise ArgumentError(f"distillation launches: `{what}` must be one of {known} (this module's), got {value!r}")
        return value

    @property
    def path(self) -> str:
        return self._path

    @path.setter
    def path(self, value: str) -> None:
        if value not in PATHS:
            raise ArgumentError(f"distillation launches: `path` must be one of {PATHS}, got {value!r}")
        self._path = value

    def _launch(self, cu_seqlens, max_seqlen: int, total: int, placeholder):
        """A launch helper: (grid axis 0 over tiles of `tile` rows, the kernels' CU_SEQLENS, TILES and VARLEN) of a
        batched call (cu_seqlens None: `rows` rows per batch entry, placeholders) or a native packed one (the
        layout's tile table over each sequence's rows; docs/varlen.md)."""
        if cu_seqlens is None:
            return None, lambda tile, rows: ((_cdiv(rows, tile),), (placeholder, placeholder), {})
        layout = packed_map(cu_seqlens, max_seqlen, total).layout()

        def grid(tile, rows):
            table, programs = layout.token_tiles(tile)
            return (programs,), (layout.cu_seqlens, table), {"VARLEN": True}
        return layout, grid

    def forward(self, q, k, q_idx, k_idx, w_idx, indices, lse_main, cu_seqlens=None, max_seqlen: int = 0,
                p_main=None):
        """(loss fp32 [], stats fp32 [B, T, HKV, 2] = (lse of I over the support, mass of p), lse of the main
        attention [B, T, HQ] when it was not given (else an empty tensor), p of every selected pair
        [B, T, HKV, top_k] fp32 on the fused path's sparse stage (else an empty tensor)). With `cu_seqlens` (a
        native packed call) the inputs are a batch of one [1, total, ...] and the kernels walk each sequence's
        tiles. `p_main` (sparse stage, fp32 in the indices' layout): the target given, q, k and lse_main unread;
        neither lse nor p is returned (the autograd glue saves p_main itself)."""
        B, T = q.shape[0], q.shape[1]
        device, hkv, kern = q.device, self.heads_kv, self.kernels
        row_kl = torch.empty((B, T, hkv), dtype=torch.float32, device=device)
        stats = torch.empty((B, T, hkv, 2), dtype=torch.float32, device=device)
        lse_out = torch.empty((0,) if lse_main is not None or p_main is not None else (B, T, self.heads_q),
                              dtype=torch.float32, device=device)
        lse = lse_main if lse_main is not None else lse_out
        strides = _strides(q, k, q_idx, k_idx, w_idx)
        _, grid = self._launch(cu_seqlens, max_seqlen, T, row_kl)
        fused = self.path == "fused"
        sfx = "_fused" if fused else ""
        meta = dict(HAS_LSE=lse_main is not None, WIDEN=self.widen,
                    **(self.fused_options if fused else self.options))
        p_sel = row_kl.new_empty((0,))
        if p_main is not None:
            tiles, tables, varlen = grid(1, T)
            kern["fwd_sparse_from_p"][tiles + (B * hkv,)](
                q_idx, k_idx, w_idx, indices, p_main, row_kl, stats, *tables, *strides[6:], T, self.scales[1],
                WIDEN=self.widen, **self.bwd_options, **varlen)
        elif indices is None and self.unabsorbed(k):
            m = self.mha
            tiles, tables, varlen = grid(m["bq"], T)
            kern["fwd_dense_mha"][tiles + (B * hkv,)](
                q, k, q_idx, k_idx, w_idx, row_kl, lse, lse_out, row_kl, stats, p_sel, *tables, *strides, T,
                *self.scales, HAS_LSE=lse_main is not None, WIDEN=self.widen, num_warps=m["warps"],
                **self._mha_fwd_tile(m), **varlen)
        elif indices is None:
            tiles, tables, varlen = grid(self.bt, T)
            name, form = "fwd_dense", {}
            if fused:
                form = self.dense_forms.get(self.dense_fwd_form, {})
                name = "fwd_dense_qreg" if form else "fwd_dense_fused"
            kern[name][tiles + (B * hkv,)](
                q, k, q_idx, k_idx, w_idx, row_kl, lse, lse_out, row_kl, stats, p_sel, *tables, *strides, T,
                *self.scales, **meta, **varlen, **form)
        else:
            if fused:
                p_sel = torch.empty((B, T, hkv, self.top_k), dtype=torch.float32, device=device)
            tiles, tables, varlen = grid(1, T)
            form = {"FORM": FWD_FORMS.index(self.fwd_form)} if fused else {}
            kern["fwd_sparse" + sfx][tiles + (B * hkv,)](
                q, k, q_idx, k_idx, w_idx, indices, lse, lse_out, row_kl, stats, p_sel if fused else row_kl,
                *tables, *strides, T, *self.scales, STORE_P=fused, **form, **meta, **varlen)
        # Mean over the valid (b, t, g) rows; a row with an empty support has lse -inf and KL 0 (a packed batch has
        # no other rows: nothing is padded).
        n_valid = torch.isfinite(stats[..., 0]).sum().clamp(min=1)
        loss = (row_kl.sum(dtype=torch.float64) / n_valid).to(torch.float32)
        return loss, stats, lse_out, p_sel

    def forward_fake(self, q, k, q_idx, k_idx, w_idx, indices, lse_main, cu_seqlens=None, max_seqlen: int = 0,
                     p_main=None):
        B, T = q.shape[0], q.shape[1]
        fused = indices is not None and self.path == "fused" and p_main is None
        sel = (B, T, self.heads_kv, self.top_k) if fused else (0,)
        no_lse = lse_main is not None or p_main is not None
        return (q.new_empty((), dtype=torch.float32), q.new_empty((B, T, self.heads_kv, 2), dtype=torch.float32),
                q.new_empty((0,) if no_lse else (B, T, self.heads_q), dtype=torch.float32),
                q.new_empty(sel, dtype=torch.float32))

    def backward(self, grad, q, k, q_idx, k_idx, w_idx, indices, lse, stats, p_sel, cu_seqlens=None,
                 max_seqlen: int = 0):
        """(dq_idx, dk_idx, dw_idx) of grad * loss. Dense stage: two passes over the support (query side, key
        side). Sparse stage: after a fused forward (p_sel not empty) one pass, dk_idx by fp32 atomics, unless
        torch's deterministic mode is on; else the legacy query-side pass, the inverse index and its key side.
        A target given to the forward (p_main: p_sel is it, lse empty) has no legacy pass (it recomputes p from q,
        k and lse): in deterministic mode the one pass stores each pair's dI instead of adding dk_idx, and the
        inverse index's key side sums them."""
        B, T = q.shape[0], q.shape[1]
        device, hkv, kern = q.device, self.heads_kv, self.kernels
        n_valid = torch.isfinite(stats[..., 0]).sum().clamp(min=1)
        gscale = (grad.to(torch.float32) / n_valid).reshape(1)
        dq_idx = torch.empty(q_idx.shape, dtype=q_idx.dtype, device=device)
        dk_idx = torch.empty(k_idx.shape, dtype=k_idx.dtype, device=device)
        dw_idx = torch.empty(w_idx.shape, dtype=w_idx.dtype, device=device)
        strides = _strides(q, k, q_idx, k_idx, w_idx)
        layout, grid = self._launch(cu_seqlens, max_seqlen, T, stats)
        meta = dict(WIDEN=self.widen, **self.options)
        if indices is None and self.unabsorbed(k):
            self._backward_mha(q, k, q_idx, k_idx, w_idx, lse, stats, gscale, dq_idx, dk_idx, dw_idx, strides, layout,
                               grid, max_seqlen)
        elif indices is None:
            fused = self.path == "fused"
            sfx = "_fused" if fused else ""
            meta = dict(WIDEN=self.widen, **(self.fused_options if fused else self.options))
            tiles, tables, varlen = grid(self.bt, T)
            name, form = "dq_dense" + sfx, {}
            if fused and self.dense_dq_form != "base":
                name, form = "dq_dense_qreg", self.dense_forms[self.dense_dq_form]
            kern[name][tiles + (B * hkv,)](
                q, k, q_idx, k_idx, w_idx, stats, lse, stats, gscale, dq_idx, dw_idx, stats, *tables, *strides,
                T, *self.scales, **meta, **varlen, **form)
            tiles, tables, varlen = grid(self.fused_bk if fused else self.bk, T)
            kern["dk_dense" + sfx][tiles + (B * hkv,)](
                q, k, q_idx, k_idx, w_idx, lse, stats, gscale, dk_idx, *tables, *strides, T, *self.scales,
                **meta, **varlen)
        elif p_sel.numel() and (not torch.are_deterministic_algorithms_enabled() or not lse.numel()):
            # One pass from the stored (or given) p; dk_I summed in fp32 by atomics (order-dependent in the last
            # bits), or, deterministic, from each pair's dI by the inverse index's key side.
            det = torch.are_deterministic_algorithms_enabled()
            dk_acc = stats if det else torch.zeros(k_idx.shape, dtype=torch.float32, device=device)
            di_sel = torch.empty((B, T, hkv, self.top_k) if det else (0,), dtype=torch.float32, device=device)
            tiles, tables, varlen = grid(1, T)
            kern["bwd_sparse_fused"][tiles + (B * hkv,)](
                q_idx, k_idx, w_idx, indices, p_sel, stats, gscale, dq_idx, dw_idx, dk_acc, di_sel, *tables,
                *strides[6:], T, self.scales[1], WIDEN=self.widen, DETERMINISTIC=det, **self.bwd_options, **varlen)
            if det:
                self._dk_sparse(indices, layout, grid, q_idx, k_idx, w_idx, di_sel, gscale, dk_idx, strides, T, meta)
            else:
                dk_idx.copy_(dk_acc.mul_(gscale * self.scales[1]))
        else:
            # dI of every selected pair (unscaled), written by the query-side kernel for the key-side one.
            di_sel = torch.empty((B, T, hkv, self.top_k), dtype=torch.float32, device=device)
            tiles, tables, varlen = grid(1, T)
            kern["dq_sparse"][tiles + (B * hkv,)](
                q, k, q_idx, k_idx, w_idx, indices, lse, stats, gscale, dq_idx, dw_idx, di_sel, *tables, *strides,
                T, *self.scales, **meta, **varlen)
            self._dk_sparse(indices, layout, grid, q_idx, k_idx, w_idx, di_sel, gscale, dk_idx, strides, T, meta)
        return dq_idx, dk_idx, dw_idx

    @staticmethod
    def _mha_fwd_tile(m: dict) -> dict:
        """The unabsorbed forward's key tile and stages as launch arguments (the kernel's defaults are the plan's;
        a module built before they were in its descriptor passes none): a benchmark can set them, and `warps`,
        in `mha` to time other tiles (bench/distill_bench.py's fused_unabsorbed_* variants)."""
        return {k: m[n] for k, n in (("BK", "bk"), ("STAGES", "stages")) if n in m}

    def _backward_mha(self, q, k, q_idx, k_idx, w_idx, lse, stats, gscale, dq_idx, dk_idx, dw_idx, strides, layout,
                      grid, max_seqlen):
        """The dense stage's backward from unabsorbed q and k (docs/distill.md, "The dense stage from the unabsorbed
        heads"), by strips of query tiles: per strip, dI of its rows (the only pass over the per-head main logits)
        into a workspace of at most mha["workspace"] bytes (at least one query tile of every (b, g): B * HKV * BQ *
        T * 4 bytes), then the query side (dq_idx, dw_idx of the strip's rows) and the key side (the strip's share
        of dk_I, summed in fp32 strip after strip: deterministic, no atomics) read it."""
        m, kern = self.mha, self.kernels
        B, T = q.shape[0], q.shape[1]
        bg, bq = B * self.heads_kv, m["bq"]
        ld = T if layout is None else max_seqlen
        if layout is None:
            qtable, n_tiles, varlen = stats, _cdiv(T, bq), {}
        else:
            (qtable, n_tiles), varlen = layout.token_tiles(bq), {"VARLEN": True}
        nts = max(1, min(n_tiles, m["workspace"] // (bg * bq * ld * 4)))
        di = torch.empty((bg, nts * bq, ld), dtype=torch.float32, device=q.device)
        dk_acc = torch.zeros(k_idx.shape, dtype=torch.float32, device=q.device)
        n_kb = _cdiv(ld, m["kb"])
        ktiles, ktables, _ = grid(m["dk_bs"], T)
        cu = layout.cu_seqlens if layout is not None else stats
        idx_meta = dict(WIDEN=self.widen, num_warps=m["idx_warps"], num_stages=m["idx_stages"], **varlen)
        for tile0 in range(0, n_tiles, nts):
            nt = min(nts, n_tiles - tile0)
            kern["di_dense_mha"][(nt * n_kb, bg)](
                q, k, q_idx, k_idx, w_idx, lse, stats, di, cu, qtable, *strides, T, *self.scales, tile0, nts, ld,
                n_kb, WIDEN=self.widen, num_warps=m["warps"], **varlen)
            kern["dq_dense_mha"][(nt * (bq // m["bt"]), bg)](
                q_idx, k_idx, w_idx, di, gscale, dq_idx, dw_idx, cu, qtable, *strides[6:], T, self.scales[1], tile0,
                nts, ld, **idx_meta)
            kern["dk_dense_mha"][ktiles + (bg,)](
                q_idx, k_idx, w_idx, di, dk_acc, *ktables, qtable, *strides[6:], T, tile0, nt, nts, ld, **idx_meta)
        dk_idx.copy_(dk_acc.mul_(gscale * self.scales[1]))

    def _dk_sparse(self, indices, layout, grid, q_idx, k_idx, w_idx, di_sel, gscale, dk_idx, strides, T, meta):
        """The sparse stage's deterministic key side: dk_idx from each selected pair's dI through the inverse
        index (no atomics)."""
        ptr, pos = self.inverse_index(indices, layout)
        tiles, tables, varlen = grid(self.sbk, T)
        self.kernels["dk_sparse"][tiles + (q_idx.shape[0] * self.heads_kv,)](
            q_idx, k_idx, w_idx, indices, di_sel, ptr, pos, gscale, dk_idx, *tables, *strides[6:], T,
            self.scales[1], **meta, **varlen)

    def backward_fake(self, grad, q, k, q_idx, k_idx, w_idx, indices, lse, stats, p_sel, cu_seqlens=None,
                      max_seqlen: int = 0):
        return torch.empty_like(q_idx), torch.empty_like(k_idx), torch.empty_like(w_idx)


_OPS: dict = {}


def custom_ops(namespace: str, launches: Launches) -> tuple:
    """The custom ops `<namespace>::distill_fwd` and `::distill_bwd` of a module, their bodies `launches.forward` /
    `launches.backward` (see those for what they return), each with `register_fake`.

    Registered once per process: a later module whose namespace is the same (same spec and tiles, so the same
    kernels and launches: the committed generated module and a specgen.load copy, say) gets the ops the first one
    registered. Registering the names again would not fail: torch.library.custom_op destroys the first
    registration's library, and the first module's ops would then dispatch through a freed operator entry (use
    after free: `ValueError: vector::reserve`, `std::bad_alloc` or a crash in a later call)."""
    ops = _OPS.get(namespace)
    if ops is not None:
        return ops

    def distill_fwd(q: torch.Tensor, k: torch.Tensor, q_idx: torch.Tensor, k_idx: torch.Tensor,
                    w_idx: torch.Tensor, indices: Optional[torch.Tensor], lse_main: Optional[torch.Tensor],
                    cu_seqlens: Optional[torch.Tensor], max_seqlen: int, p_main: Optional[torch.Tensor] = None
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        return launches.forward(q, k, q_idx, k_idx, w_idx, indices, lse_main, cu_seqlens, max_seqlen, p_main)

    def distill_bwd(grad: torch.Tensor, q: torch.Tensor, k: torch.Tensor, q_idx: torch.Tensor, k_idx: torch.Tensor,
                    w_idx: torch.Tensor, indices: Optional[torch.Tensor], lse: torch.Tensor, stats: torch.Tensor,
                    p_sel: torch.Tensor, cu_seqlens: Optional[torch.Tensor], max_seqlen: int
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return launches.backward(grad, q, k, q_idx, k_idx, w_idx, indices, lse, stats, p_sel, cu_seqlens,
                                 max_seqlen)

    fwd = torch.library.custom_op(namespace + "::distill_fwd", distill_fwd, mutates_args=())
    bwd = torch.library.custom_op(namespace + "::distill_bwd", distill_bwd, mutates_args=())
    fwd.register_fake(launches.forward_fake)
    bwd.register_fake(launches.backward_fake)
    ops = _OPS[namespace] = (fwd, bwd)
    return ops


class Distill:
    """The distillation loss of one generated module: `fwd`/`bwd` its custom ops, `index_topk` its indexer top-k,
    `default_stage` the spec's indexer.stage, `unabsorbed_qk` the spec's unabsorbed.qk (0 without the field: q and
    k come in the absorbed form only)."""

    def __init__(self, desc, fwd, bwd, index_topk, default_stage: str, unabsorbed_qk: int = 0):
        self.desc = desc
        self.fwd, self.bwd, self.index_topk = fwd, bwd, index_topk
        self.default_stage = default_stage
        self.unabsorbed_qk = unabsorbed_qk
        by_name = {a.name: a for a in desc.args}
        self.inputs = tuple(by_name[n] for n in INPUTS)

    def main_form(self, fn: str, q, k, stage: str, packed: bool) -> str:
        """Which form the main attention's q and k come in, from their last two dims: "absorbed" (k: Hkv heads of
        the spec's d_qk) or "unabsorbed" (k: a key per query head, of unabsorbed.qk dims; dense stage only). Shapes
        that fit neither raise, naming the argument, what it got and both forms; the rest of each tensor (rank,
        B, T, dtype, device) is check_tensor's."""
        d, u = self.desc, self.unabsorbed_qk
        if not (isinstance(q, torch.Tensor) and isinstance(k, torch.Tensor) and q.dim() >= 2 and k.dim() >= 2):
            return "absorbed"
        lead = "[total, " if packed else "[B, T, "
        absorbed = (d.heads_q, d.dim_qk), (d.heads_kv, d.dim_qk)
        unabsorbed = (d.heads_q, u), (d.heads_q, u)
        got = tuple(q.shape[-2:]), tuple(k.shape[-2:])
        forms = f"q {lead}{d.heads_q}, {d.dim_qk}] with k {lead}{d.heads_kv}, {d.dim_qk}]"
        if not u:
            if d.mla and got[1] == (d.heads_q, got[0][1]) and d.heads_q != d.heads_kv:
                raise ArgumentError(
                    f"{fn}: argument `k` has shape {list(k.shape)}, a key per query head (the unabsorbed form), but "
                    f"spec {d.spec_name!r} has no `unabsorbed` head dims: it takes {forms}; add `unabsorbed: {{qk: "
                    f"..., v: ...}}` to an MLA spec to pass per-head keys to the dense stage, or pass the absorbed "
                    f"q and k")
            return "absorbed"
        forms = (f"the absorbed {forms}, or (dense stage) the unabsorbed q {lead}{d.heads_q}, {u}] with k "
                 f"{lead}{d.heads_q}, {u}] (a key per query head)")
        if got == absorbed:
            return "absorbed"
        if got[0] == unabsorbed[0] or got[1] == unabsorbed[1]:
            bad = "k" if got[0] == unabsorbed[0] else "q"
            if got != unabsorbed:
                raise ArgumentError(
                    f"{fn}: argument `{bad}` has shape {list((q, k)[bad == 'k'].shape)}, but `"
                    f"{'q' if bad == 'k' else 'k'}` {list((k, q)[bad == 'k'].shape)} is in the unabsorbed form; "
                    f"the main attention's queries and keys must be {forms}")
            if stage != "dense":
                raise ArgumentError(
                    f"{fn}: q {list(q.shape)} and k {list(k.shape)} are the unabsorbed form (a key per query "
                    f"head), which only the dense stage takes; the {stage} stage needs the absorbed q {lead}"
                    f"{d.heads_q}, {d.dim_qk}] with k {lead}{d.heads_kv}, {d.dim_qk}] (pass stage='dense' for the "
                    f"warm-up stage)")
            return "unabsorbed"
        bad = "q" if got[0] not in (absorbed[0], unabsorbed[0]) else "k"
        raise ArgumentError(f"{fn}: argument `{bad}` has shape {list((q, k)[bad == 'k'].shape)} (q "
                            f"{list(q.shape)}, k {list(k.shape)}); the main attention's queries and keys must be "
                            f"{forms}")

    def setup_context(self, ctx, inputs, output):
        q, k, q_idx, k_idx, w_idx, indices, lse_main, cu_seqlens, max_seqlen = inputs[:9]
        p_main = inputs[9] if len(inputs) > 9 else None
        _, stats, lse_out, p_sel = output
        if p_main is not None:  # the backward's p, and no lse (Launches.backward: a given target)
            lse_main, p_sel = None, p_main
        ctx.save_for_backward(q, k, q_idx, k_idx, w_idx, indices, lse_main if lse_main is not None else lse_out,
                              stats, p_sel, cu_seqlens)
        ctx.max_seqlen = max_seqlen

    def backward(self, ctx, grad, _grad_stats, _grad_lse, _grad_p):
        q, k, q_idx, k_idx, w_idx, indices, lse, stats, p_sel, cu_seqlens = ctx.saved_tensors
        dq_idx, dk_idx, dw_idx = self.bwd(grad, q, k, q_idx, k_idx, w_idx, indices, lse, stats, p_sel, cu_seqlens,
                                          ctx.max_seqlen)
        # The target is detached: no gradient reaches the main attention's q and k (nor lse_main, nor p_main).
        return None, None, dq_idx, dk_idx, dw_idx, None, None, None, None, None

    def loss(self, q, k, q_idx, k_idx, w_idx, *, indices=None, lse_main=None, stage=None, cu_seqlens=None,
             max_seqlen=None, p_main=None):
        """`distill_loss`; see the generated docstring."""
        d = self.desc
        fn = "distill_loss"
        dims: dict = {}
        if stage is None:
            stage = "sparse" if indices is not None else self.default_stage
        if stage not in ("dense", "sparse"):
            raise ArgumentError(f"{fn}: argument `stage` must be 'dense' or 'sparse' (or None: the spec's "
                                f"'{self.default_stage}'), got {stage!r}")
        if stage == "dense" and indices is not None:
            raise ArgumentError(f"{fn}: the dense warm-up stage distils over every s <= t and takes no "
                                f"`indices`; pass stage='sparse' to distil over a selection")
        packed_call = cu_seqlens is not None or max_seqlen is not None
        form = self.main_form(fn, q, k, stage, packed_call)
        x = [q, k, q_idx, k_idx, w_idx]
        for i, a in enumerate(self.inputs):
            shape = a.packed_shape if packed_call else a.shape
            if i < 2 and form == "unabsorbed":
                shape = shape[:-2] + (d.heads_q, self.unabsorbed_qk)
            x[i] = check_tensor(fn, a.name, x[i], shape, d.dtype, dims, None if i == 0 else device)
            if i == 0:
                device = x[0].device
                if not packed_call:
                    check_seqlen(fn, x[0].shape[1], d.max_seqlen, d.spec_name)
        q, k, q_idx, k_idx, w_idx = x
        rows = (q.shape[0],) if packed_call else (q.shape[0], q.shape[1])
        packed = None
        if len(rows) == 1:
            packed = check_varlen(fn, cu_seqlens, max_seqlen, rows[0], device, d.max_seqlen, d.spec_name)
        if indices is not None:
            indices = check_indices(fn, indices, rows + (d.heads_kv, d.top_k), device, d.unit, packed)
        if lse_main is not None:
            lse_main = check_tensor(fn, "lse_main", lse_main, rows + (d.heads_q,), torch.float32, {}, device).detach()
        if p_main is not None:
            if stage != "sparse" or indices is None:
                raise ArgumentError(f"{fn}: argument `p_main` is the sparse stage's target at the slots of `indices`: "
                                    f"pass the indices it was computed on (stage 'sparse')")
            p_main = check_tensor(fn, "p_main", p_main, rows + (d.heads_kv, d.top_k), torch.float32, {},
                                  device).detach()
        varlen = (None, 0)
        if packed is not None:
            # Native (docs/varlen.md): the packed rows run as a batch of one [1, total, ...] (views), the kernels
            # walking each sequence's tiles; nothing is padded, and every row is a real one.
            if indices is None and stage == "sparse":
                indices = self.index_topk(q_idx.detach(), k_idx.detach(), w_idx.detach(),
                                          cu_seqlens=packed.cu_seqlens, max_seqlen=packed.max_seqlen)
            q, k, q_idx, k_idx, w_idx = (t.unsqueeze(0) for t in (q, k, q_idx, k_idx, w_idx))
            indices = None if indices is None else indices.unsqueeze(0)
            lse_main = None if lse_main is None else lse_main.unsqueeze(0)
            p_main = None if p_main is None else p_main.unsqueeze(0)
            varlen = (packed.cu_seqlens, packed.max_seqlen)
        elif indices is None and stage == "sparse":
            indices = self.index_topk(q_idx.detach(), k_idx.detach(), w_idx.detach())
        if lse_main is not None:
            lse_main = lse_main.contiguous()
        if indices is not None:
            indices = indices.contiguous()
        given = () if p_main is None else (p_main.contiguous(),)  # (the op's last argument, None by default)
        return self.fwd(q.detach(), k.detach(), q_idx, k_idx, w_idx, indices, lse_main, *varlen, *given)[0]
