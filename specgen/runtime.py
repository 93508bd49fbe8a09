"""The small runtime that generated modules import: argument checks and interpreter detection.

Generated modules import torch, triton and this file only, so importing a kernel never parses YAML, renders
templates or calls sympy. Keep it that way: no imports from the rest of specgen here.
"""

from __future__ import annotations

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
