"""The small runtime that generated modules import: argument checks and interpreter detection.

Generated modules import torch, triton and this file only, so importing a kernel never parses YAML, renders
templates or calls sympy. Keep it that way: no imports from the rest of specgen here.
"""

from __future__ import annotations

import operator
import os

import torch


class ArgumentError(ValueError):
    """A call-time mistake: wrong shape, dtype, device or a missing input. Raised before any kernel runs."""


def interpreting() -> bool:
    """True under Triton's CPU interpreter (TRITON_INTERPRET=1)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def _fmt(shape) -> str:
    return "[" + ", ".join(str(s) for s in shape) + "]"


def check_tensor(fn: str, name: str, x, shape: tuple, dtype: torch.dtype | None, dims: dict,
                 device: torch.device | None = None, where: str = "") -> torch.Tensor:
    """Check one argument against an expected shape whose str entries are symbols bound across arguments.

    The first argument that mentions a symbol (B, T, ...) binds it; later ones must agree. Returns the tensor,
    copied only when its last dimension is not contiguous (kernels need unit stride there; slices of a fused
    projection keep theirs and are used as they are).
    """
    if not isinstance(x, torch.Tensor):
        raise ArgumentError(f"{fn}: argument `{name}` must be a torch.Tensor of shape {_fmt(shape)}"
                            f"{where}, got {type(x).__name__}")
    if x.dim() != len(shape):
        raise ArgumentError(f"{fn}: argument `{name}` must have {len(shape)} dims {_fmt(shape)}{where}, "
                            f"got shape {_fmt(tuple(x.shape))}")
    for axis, (want, got) in enumerate(zip(shape, x.shape)):
        if isinstance(want, str):
            bound = dims.setdefault(want, (got, name))
            if bound[0] != got:
                raise ArgumentError(f"{fn}: argument `{name}` has {want}={got} (dim {axis}) but `{bound[1]}` has "
                                    f"{want}={bound[0]}; expected shape {_fmt(shape)}")
        elif want != got:
            raise ArgumentError(f"{fn}: argument `{name}` must have shape {_fmt(shape)}{where}, got "
                                f"{_fmt(tuple(x.shape))} (dim {axis} is {got}, the spec needs {want})")
    if dtype is not None and x.dtype != dtype:
        raise ArgumentError(f"{fn}: argument `{name}` must be {dtype} (the spec's dtype), got {x.dtype}; "
                            f"cast it with .to({dtype}) or build a spec with that dtype")
    if device is not None and x.device != device:
        raise ArgumentError(f"{fn}: argument `{name}` is on {x.device} but `q` is on {device}; "
                            f"move all inputs to one device")
    if x.numel() and x.stride(-1) != 1:
        x = x.contiguous()
    return x


def check_seqlen(fn: str, T: int, max_seqlen: int, spec_name: str) -> None:
    if T < 1:
        raise ArgumentError(f"{fn}: the sequence is empty (T={T}); pass at least one token")
    if T > max_seqlen:
        raise ArgumentError(f"{fn}: T={T} exceeds the spec's max_seqlen={max_seqlen} (spec {spec_name}); "
                            f"raise max_seqlen in the spec and rebuild")


def check_out(fn: str, out, shape: tuple, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    if out is None:
        return torch.empty(shape, dtype=dtype, device=device)
    if not isinstance(out, torch.Tensor) or tuple(out.shape) != tuple(shape) or out.dtype != dtype \
            or out.device != device or not out.is_contiguous():
        got = (f"{_fmt(tuple(out.shape))} {out.dtype} on {out.device}"
               f"{'' if out.is_contiguous() else ', not contiguous'}") if isinstance(out, torch.Tensor) \
            else type(out).__name__
        raise ArgumentError(f"{fn}: argument `out` must be a contiguous {dtype} tensor of shape {_fmt(shape)} on "
                            f"{device}, got {got}")
    return out


def check_indices(fn: str, indices, shape: tuple, device: torch.device) -> torch.Tensor:
    if not isinstance(indices, torch.Tensor) or tuple(indices.shape) != tuple(shape) or indices.dtype != torch.int32:
        got = (f"{_fmt(tuple(indices.shape))} {indices.dtype}" if isinstance(indices, torch.Tensor)
               else type(indices).__name__)
        raise ArgumentError(f"{fn}: argument `indices` must be int32 of shape {_fmt(shape)} (ascending, -1 padding "
                            f"last), got {got}")
    if indices.device != device:
        raise ArgumentError(f"{fn}: argument `indices` is on {indices.device} but `q` is on {device}")
    return indices.contiguous()


def require(fn: str, name: str, value, why: str):
    if value is None:
        raise ArgumentError(f"{fn}: argument `{name}` is required: {why}")
    return value


_device_names: dict = {}


def launch_config(configs: dict, kernel: str) -> dict:
    """The launch config of `kernel` for the current GPU: its tuned entry if the module has one, else the default."""
    device = torch.cuda.current_device() if torch.cuda.is_available() else -1
    name = _device_names.get(device)
    if name is None:
        name = _device_names[device] = torch.cuda.get_device_name(device) if device >= 0 else "cpu"
    tuned = configs.get(name, {}).get(kernel)
    return tuned if tuned is not None else configs["default"][kernel]


# ---------------------------------------------------------------------------------------------------------------
# Packed (varlen) batches: flash-attn's cu_seqlens convention, run as a padded [N, max_seqlen] batch
# ---------------------------------------------------------------------------------------------------------------


class Packed:
    """The map between a packed batch [total, ...] (sequence i is rows cu_seqlens[i] : cu_seqlens[i+1]) and the
    padded batch [N, max_seqlen, ...] the batched kernels run on (sequence i at positions 0..len_i - 1 of row i).

    Every spec is causal, so a valid query t < len_i only ever reads keys s <= t of its own sequence: the padding
    never reaches a valid row, and in the backward the padded rows get zero output gradient (the unpad's
    backward), so they send nothing to valid keys. Built on the device from cu_seqlens, without a host sync.
    """

    def __init__(self, cu_seqlens: torch.Tensor, max_seqlen: int, total: int):
        self.n = cu_seqlens.numel() - 1
        self.max_seqlen = max_seqlen
        self.total = total
        cu = cu_seqlens.long()
        tok = torch.arange(total, device=cu.device)
        # The sequence of each token: the last start <= tok (right=True skips empty sequences, whose start repeats).
        seq = torch.searchsorted(cu, tok, right=True) - 1
        self.dst = seq * max_seqlen + (tok - cu[seq])                     # flat padded row of each packed token
        pos = torch.arange(max_seqlen, device=cu.device)
        self.row_ok = pos[None, :] < (cu[1:] - cu[:-1])[:, None]         # [N, max_seqlen] rows holding a token

    def positions(self) -> torch.Tensor:
        """Position of each packed token within its sequence, [total] (0 at every sequence's start)."""
        return self.dst % self.max_seqlen

    def pad(self, x: torch.Tensor, fill=0) -> torch.Tensor:
        """[total, ...] -> [N, max_seqlen, ...], `fill` in the padding; differentiable in x (index_copy_)."""
        rest = tuple(x.shape[1:])
        base = torch.full((self.n * self.max_seqlen,) + rest, fill, dtype=x.dtype, device=x.device)
        # In place: the out-of-place index_copy would clone the padded buffer (twice its memory at once).
        return base.index_copy_(0, self.dst, x).view((self.n, self.max_seqlen) + rest)

    def unpad(self, x: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        """[N, max_seqlen, ...] -> [total, ...] (into `out` when given); differentiable (index_select)."""
        flat = x.reshape((self.n * self.max_seqlen,) + tuple(x.shape[2:]))
        if out is not None:
            return torch.index_select(flat, 0, self.dst, out=out)
        return flat.index_select(0, self.dst)


def _compiling() -> bool:
    return hasattr(torch, "compiler") and torch.compiler.is_compiling()


def _no_host_reads() -> bool:
    """Under torch.compile or while a CUDA graph is captured, reading a tensor on the host is not allowed."""
    return _compiling() or (torch.cuda.is_available() and torch.cuda.is_current_stream_capturing())


def check_varlen(fn: str, cu_seqlens, max_seqlen, total: int, device: torch.device, spec_max_seqlen: int,
                 spec_name: str) -> Packed:
    """Check a packed batch's cu_seqlens and max_seqlen and return its pad/unpad map.

    The values of cu_seqlens are checked too (starts at 0, non-decreasing, ends at `total`, no sequence longer
    than max_seqlen): that reads them on the host once per call. Under torch.compile or CUDA graph capture the
    values are not read (no graph break, no sync); as with flash-attn, wrong values are then the caller's bug.
    """
    if cu_seqlens is None:
        raise ArgumentError(f"{fn}: `max_seqlen` was given without `cu_seqlens`; pass both for a packed batch "
                            f"[total, H, D] (cu_seqlens int32 [N+1]), or neither for [B, T, H, D]")
    if not isinstance(cu_seqlens, torch.Tensor) or cu_seqlens.dim() != 1 or cu_seqlens.numel() < 2:
        got = (f"shape {_fmt(tuple(cu_seqlens.shape))}" if isinstance(cu_seqlens, torch.Tensor)
               else type(cu_seqlens).__name__)
        raise ArgumentError(f"{fn}: argument `cu_seqlens` must be a 1-D int32 tensor [N+1] of sequence offsets "
                            f"(N >= 1), got {got}")
    if cu_seqlens.dtype != torch.int32:
        raise ArgumentError(f"{fn}: argument `cu_seqlens` must be int32 (flash-attn's convention), got "
                            f"{cu_seqlens.dtype}; pass cu_seqlens.to(torch.int32)")
    if cu_seqlens.device != device:
        raise ArgumentError(f"{fn}: argument `cu_seqlens` is on {cu_seqlens.device} but `q` is on {device}; "
                            f"move it to the inputs' device")
    if max_seqlen is None:
        raise ArgumentError(f"{fn}: argument `max_seqlen` is required with `cu_seqlens`: the length of the "
                            f"longest sequence, an int (as in flash_attn_varlen_func)")
    if isinstance(max_seqlen, torch.Tensor) and max_seqlen.numel() == 1 and not _compiling():
        max_seqlen = int(max_seqlen)
    elif not isinstance(max_seqlen, (int, torch.SymInt, torch.Tensor)) and hasattr(max_seqlen, "__index__"):
        max_seqlen = operator.index(max_seqlen)  # numpy integers
    # (torch.compile may pass a SymInt: a size it traces symbolically.)
    if not isinstance(max_seqlen, (int, torch.SymInt)) or isinstance(max_seqlen, bool) or max_seqlen < 1:
        raise ArgumentError(f"{fn}: argument `max_seqlen` must be a positive int (the longest sequence's length), "
                            f"got {max_seqlen!r}")
    if max_seqlen > spec_max_seqlen:
        raise ArgumentError(f"{fn}: max_seqlen={max_seqlen} exceeds the spec's max_seqlen={spec_max_seqlen} "
                            f"(spec {spec_name}); raise max_seqlen in the spec and rebuild")
    if not _no_host_reads():
        cu = cu_seqlens.tolist()
        if cu[0] != 0:
            raise ArgumentError(f"{fn}: argument `cu_seqlens` must start at 0, got {cu[0]}")
        lens = [b - a for a, b in zip(cu[:-1], cu[1:])]
        if min(lens) < 0:
            i = next(i for i, n in enumerate(lens) if n < 0)
            raise ArgumentError(f"{fn}: argument `cu_seqlens` must be non-decreasing, but cu_seqlens[{i + 1}]="
                                f"{cu[i + 1]} < cu_seqlens[{i}]={cu[i]}")
        if cu[-1] != total:
            raise ArgumentError(f"{fn}: argument `cu_seqlens` ends at {cu[-1]} but the packed inputs hold {total} "
                                f"tokens (dim 0 of `q`); the last offset must be the total")
        if max(lens) > max_seqlen:
            i = lens.index(max(lens))
            raise ArgumentError(f"{fn}: sequence {i} has {lens[i]} tokens but `max_seqlen` is {max_seqlen}; pass "
                                f"max_seqlen >= the longest sequence ({max(lens)})")
    return Packed(cu_seqlens, max_seqlen, total)


FP8_MAX = 448.0  # largest finite float8_e4m3fn
FP8_CHUNK_ELEMENTS = 1 << 24


def fp8_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x quantised to float8_e4m3fn row by row (over the last dim): (x8, scale fp32 [...]) with x ~ x8 * scale.

    scale = amax(|row|) / 448, so every row uses the whole e4m3 range; an all-zero row gets scale 1. Computed in
    fp32 (exact for bf16 inputs) by torch's round-to-nearest-even cast, the one rounding that the kernels, the
    decode cache and the float64 reference all share through this function.
    """
    rows = x.reshape(-1, x.shape[-1])
    x8 = torch.empty(rows.shape, dtype=torch.float8_e4m3fn, device=x.device)
    scale = torch.empty(rows.shape[0], dtype=torch.float32, device=x.device)
    # Chunks of rows bound the fp32 temporaries (a whole 64k-token q_I in fp32 would be 2 GiB).
    step = max(1, FP8_CHUNK_ELEMENTS // max(1, rows.shape[1]))
    for r0 in range(0, rows.shape[0], step):
        xf = rows[r0:r0 + step].float()
        amax = xf.abs().amax(dim=-1)
        s = torch.where(amax > 0, amax / FP8_MAX, torch.ones_like(amax))
        x8[r0:r0 + step] = (xf / s.unsqueeze(-1)).to(torch.float8_e4m3fn)
        scale[r0:r0 + step] = s
    return x8.view(x.shape), scale.view(x.shape[:-1])


def require_fp8(fn: str, device: torch.device) -> None:
    """fp8 dots need sm89+ (Ada, Hopper); the CPU interpreter emulates them."""
    if device.type == "cuda" and torch.cuda.get_device_capability(device) < (8, 9):
        raise ArgumentError(f"{fn}: the spec's indexer runs in fp8_e4m3, which needs a GPU of compute capability "
                            f"8.9 or newer (this is {torch.cuda.get_device_name(device)}); build a spec with "
                            f"indexer.dtype: bf16")
