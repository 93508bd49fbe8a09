"""The runtime that generated modules import: argument checks, interpreter detection and (as it grows) the host
code they share.

Generated modules import torch, triton and this file only, so importing a kernel never parses YAML, renders
templates or calls sympy. Keep it that way: no imports from the rest of specgen here.
"""

from __future__ import annotations

import operator
import os
import sys
import weakref

import torch


class ArgumentError(ValueError):
    """A call-time mistake: wrong shape, dtype, device or a missing input. Raised before any kernel runs."""


def cdiv(a: int, b: int) -> int:
    """ceil(a / b) for non-negative a and positive b: grid sizes and tile counts on the host."""
    return -(-a // b)


def next_pow2(x: int) -> int:
    """The smallest power of two >= x (1 for x <= 1): tile widths and workspace rows on the host."""
    return 1 if x <= 1 else 1 << (x - 1).bit_length()


def interpreting() -> bool:
    """True under Triton's CPU interpreter (TRITON_INTERPRET=1)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def _interpreter_without_gpu() -> None:
    """Without a CUDA GPU, Triton runs kernels only under its CPU interpreter, and TRITON_INTERPRET must be set
    before triton is imported (Triton 3.6 decorates its own library functions, tl.zeros and the like, at import).
    Generated modules import this file before triton, so turning the interpreter on here makes CPU use work as
    written; `import specgen` does the same where no GPU device exists at all (specgen/__init__.py). An explicit
    TRITON_INTERPRET (even 0) is the user's choice and stays; when triton came first, `check_backend` names the
    fix at the first call."""
    if "TRITON_INTERPRET" not in os.environ and "triton" not in sys.modules and not torch.cuda.is_available():
        os.environ["TRITON_INTERPRET"] = "1"


_interpreter_without_gpu()
_triton_interprets: list = []  # [bool] once known: was triton imported under the interpreter?


def check_backend(fn: str, name: str, x: torch.Tensor) -> None:
    """CPU tensors need Triton's interpreter, on for triton itself and for the module's kernels; without it Triton
    fails deep inside its launcher ("0 active drivers", "Cannot call @triton.jit'd outside of the scope of a
    kernel"). One line instead, naming what to set."""
    if x.device.type != "cpu":
        return
    if not _triton_interprets:
        import triton.language as tl

        _triton_interprets.append(type(tl.zeros).__name__ == "InterpretedFunction")
    if interpreting() and _triton_interprets[0]:
        return
    if torch.cuda.is_available():
        raise ArgumentError(f"{fn}: argument `{name}` is on the CPU but the kernels run on the GPU; move the inputs "
                            f"to CUDA (or set TRITON_INTERPRET=1 before importing triton to run them on Triton's "
                            f"CPU interpreter)")
    setting = os.environ.get("TRITON_INTERPRET")
    if setting is None or interpreting():
        why = ("triton was imported before specgen could turn its CPU interpreter on" if setting is None else
               "TRITON_INTERPRET=1 was set after triton was imported, too late for Triton")
    else:
        why = f"TRITON_INTERPRET={setting} turns Triton's CPU interpreter off"
    raise ArgumentError(f"{fn}: no CUDA GPU here, so the kernels need Triton's CPU interpreter, but {why}; set "
                        f"TRITON_INTERPRET=1 in the environment before Python starts (or import specgen before "
                        f"triton and leave TRITON_INTERPRET unset)")


def _fmt(shape) -> str:
    return "[" + ", ".join(str(s) for s in shape) + "]"


def check_tensor(fn: str, name: str, x, shape: tuple, dtype: torch.dtype | None, dims: dict,
                 device: torch.device | None = None, where: str = "", device_of: str = "`q`") -> torch.Tensor:
    """Check one argument against an expected shape whose str entries are symbols bound across arguments.

    The first argument that mentions a symbol (B, T, ...) binds it; later ones must agree. Returns the tensor,
    copied only when its last dimension is not contiguous (kernels need unit stride there; slices of a fused
    projection keep theirs and are used as they are).
    """
    if not isinstance(x, torch.Tensor):
        raise ArgumentError(f"{fn}: argument `{name}` must be a torch.Tensor of shape {_fmt(shape)}"
                            f"{where}, got {type(x).__name__}")
    if device is None:  # the first argument: it fixes the device every other one must share
        check_backend(fn, name, x)
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
        raise ArgumentError(f"{fn}: argument `{name}` is on {x.device} but {device_of} is on {device}; "
                            f"move all inputs to one device")
    if x.numel() and x.stride(-1) != 1:
        x = x.contiguous()
    return x


def check_seqlen(fn: str, T: int, max_seqlen: int, spec_name: str, name: str = "q") -> None:
    if T < 1:
        raise ArgumentError(f"{fn}: argument `{name}` holds an empty sequence (T={T}, dim 1); pass at least one "
                            f"token")
    if T > max_seqlen:
        raise ArgumentError(f"{fn}: argument `{name}` has T={T} (dim 1), which exceeds the spec's "
                            f"max_seqlen={max_seqlen} (spec {spec_name}); raise max_seqlen in the spec and rebuild")


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


# Elements of `indices` checked per chunk of rows (bounds the boolean temporaries: 64 MiB each at 2**26).
INDEX_CHECK_ELEMENTS = 1 << 26
_last_indices = None  # (weakref to the last indices tensor checked, its version, its bounds key)


def check_indices(fn: str, indices, shape: tuple, device: torch.device, unit: int = 1,
                  packed: "Packed | None" = None) -> torch.Tensor:
    """Check a hand-made selection (`indices=`): int32 of `shape` on `device`, and its values.

    Each row (one query position and kv group) must list distinct units (blocks of `unit` tokens, or tokens when
    `unit` is 1) in strictly ascending order, each in [0, n) where n is the number of units of the row's sequence
    (T // unit rounded up), with -1 only as trailing padding. A unit after the query's own position is allowed
    (selected attention reads only keys s <= t inside it: it adds nothing). Values are checked in one vectorised
    pass and one host sync; a bad row raises ArgumentError naming it, the first offending slot and the fix.

    `shape` is (B, T, G, k), or (total, G, k) for a packed batch with its `packed` map (limits per sequence).
    Skipped (shape, dtype and device still checked): under torch.compile, during CUDA-graph capture (no host
    reads there) and with SPECGEN_CHECK_INDICES=0; the same tensor, unmodified, is checked once (the last one).
    """
    global _last_indices
    if not isinstance(indices, torch.Tensor) or tuple(indices.shape) != tuple(shape) or indices.dtype != torch.int32:
        got = (f"{_fmt(tuple(indices.shape))} {indices.dtype}" if isinstance(indices, torch.Tensor)
               else type(indices).__name__)
        raise ArgumentError(f"{fn}: argument `indices` must be int32 of shape {_fmt(shape)} (ascending, -1 padding "
                            f"last), got {got}")
    if indices.device != device:
        raise ArgumentError(f"{fn}: argument `indices` is on {indices.device} but `q` is on {device}")
    checked = indices.contiguous()
    if _no_host_reads() or not index_checks_enabled() or checked.numel() == 0:
        return checked
    key = (tuple(shape), unit, packed)  # a packed batch's limits depend on its map (compared by identity)
    last = _last_indices
    if last is not None and last[0]() is indices and last[1] == indices._version and last[2] in (key, None):
        return checked
    k = shape[-1]
    rows = checked.view(-1, k)
    if packed is not None:
        # Units of each row's own sequence: rows are (token, group), tokens in packed order.
        n_units = (packed.token_lengths() + unit - 1) // unit
        limit = n_units.repeat_interleave(shape[1])
    else:
        limit = -(-shape[1] // unit)
    bad = torch.empty(rows.shape[0], dtype=torch.bool, device=rows.device)
    step = max(1, INDEX_CHECK_ELEMENTS // max(k, 1))
    for r0 in range(0, rows.shape[0], step):
        chunk = rows[r0:r0 + step]
        lim = limit if isinstance(limit, int) else limit[r0:r0 + step, None]
        row_bad = ((chunk < -1) | (chunk >= lim)).any(dim=1)
        if k > 1:
            prev, cur = chunk[:, :-1], chunk[:, 1:]
            # After the first slot each entry is padding or above its predecessor, which is not padding.
            row_bad |= ((cur != -1) & ((cur <= prev) | (prev == -1))).any(dim=1)
        bad[r0:r0 + step] = row_bad
    if bool(bad.any()):  # the one host sync of a good selection
        r = int(bad.nonzero()[0])
        n = limit if isinstance(limit, int) else int(limit[r])
        raise ArgumentError(_index_error(fn, rows[r].tolist(), r, shape, unit, n, packed))
    _last_indices = (weakref.ref(indices), indices._version, key)
    return checked


def trust_indices(indices: torch.Tensor) -> torch.Tensor:
    """Mark `indices` (derived from checked ones, e.g. padded) as checked, so the next check_indices skips it."""
    global _last_indices
    _last_indices = (weakref.ref(indices), indices._version, None)
    return indices


def index_checks_enabled() -> bool:
    """Values of `indices=` are checked unless SPECGEN_CHECK_INDICES=0 (a production loop that trusts its
    selections and wants no host sync per call)."""
    return os.environ.get("SPECGEN_CHECK_INDICES", "1") != "0"


def _index_error(fn: str, row: list, r: int, shape: tuple, unit: int, n: int, packed) -> str:
    what = "token" if unit == 1 else "block"
    if packed is not None:
        token, g = divmod(r, shape[1])
        pos = int(packed.positions()[token])
        seq = int(packed.seq[token])
        where = f"indices[{token}, {g}] (sequence {seq}, position {pos}, kv group {g})"
        span = (f"sequence {seq} has {n} token{'s' * (n != 1)}" if unit == 1 else
                f"sequence {seq} has {n} block{'s' * (n != 1)} of {unit} tokens")
    else:
        b, rest = divmod(r, shape[1] * shape[2])
        t, g = divmod(rest, shape[2])
        where = f"indices[{b}, {t}, {g}] (batch {b}, position {t}, kv group {g})"
        span = f"T={shape[1]}" if unit == 1 else f"T={shape[1]} makes {n} block{'s' * (n != 1)} of {unit} tokens"
    shown = str(row) if len(row) <= 12 else str(row[:12])[:-1] + f", ... ({len(row)} slots)]"
    rule = (f"each row lists distinct {what}s in ascending order, each in [0, {n}) ({span}), with -1 only as "
            f"trailing padding")
    sort_fix = ("fix: sort each row and drop repeats (specgen.runtime.canonical_indices(indices) does that and moves "
                "-1 to the end)")
    for j, v in enumerate(row):
        if v < -1 or v >= n:
            return (f"{fn}: argument `indices` row {where} = {shown} holds {v} at slot {j}, outside [0, {n}); "
                    f"{rule}; fix: keep every entry in [0, {n}) and mark unused slots -1")
        if j == 0 or v == -1:
            continue
        prev = row[j - 1]
        if prev != -1 and v > prev:
            continue
        if prev == -1:
            problem = f"has -1 at slot {j - 1} before {what} {v} at slot {j} (-1 is padding and must come last)"
        elif v == prev:
            problem = f"lists {what} {v} twice (slots {j - 1} and {j}): it would be attended twice"
        else:
            problem = f"is not ascending: slot {j} holds {v} after {prev}"
        return f"{fn}: argument `indices` row {where} = {shown} {problem}; {rule}; {sort_fix}"
    return f"{fn}: argument `indices` row {where} = {shown} breaks the rule: {rule}"  # not reached


def canonical_indices(indices: torch.Tensor) -> torch.Tensor:
    """A selection in the form the kernels take: each row (last dim) sorted ascending, repeats dropped, every -1
    (and any other negative entry) moved to the end as -1 padding. Entries past the sequence are kept (and
    rejected by the check). Same shape and dtype; differentiable in nothing (indices carry no gradient)."""
    big = torch.iinfo(torch.int64).max
    x = indices.long()
    x = torch.where(x < 0, big, x).sort(dim=-1).values
    repeat = torch.zeros_like(x, dtype=torch.bool)
    repeat[..., 1:] = x[..., 1:] == x[..., :-1]
    x = torch.where(repeat, big, x).sort(dim=-1).values
    return torch.where(x == big, -1, x).to(indices.dtype)


def require(fn: str, name: str, value, why: str):
    if value is None:
        raise ArgumentError(f"{fn}: argument `{name}` is required: {why}")
    return value


_device_names: dict = {}


def _device_name() -> str:
    device = torch.cuda.current_device() if torch.cuda.is_available() else -1
    name = _device_names.get(device)
    if name is None:
        name = _device_names[device] = torch.cuda.get_device_name(device) if device >= 0 else "cpu"
    return name


def tuned_config(configs: dict, kernel: str) -> dict | None:
    """The tuning record's config of `kernel` for the current GPU (baked into the module), or None."""
    return configs.get(_device_name(), {}).get(kernel)


def launch_config(configs: dict, kernel: str) -> dict:
    """The launch config of `kernel` for the current GPU: its tuned entry if the module has one, else the default."""
    tuned = tuned_config(configs, kernel)
    return tuned if tuned is not None else configs["default"][kernel]


# ---------------------------------------------------------------------------------------------------------------
# Launching a tunable kernel: the tuned config, else Triton's autotuner over the module's pruned candidates
# ---------------------------------------------------------------------------------------------------------------

# Config fields that are kernel meta-parameters (the rest, num_warps and num_stages, are launch options).
META_NAMES = {"bt": "BT", "block_n": "BLOCK_N", "bq": "BQ", "key_major": "KEY_MAJOR", "key_split": "KEY_SPLIT",
              "prefetch": "PREFETCH", "gp": "GP", "reload": "RELOAD", "chunk_inner": "CHUNK_INNER"}
# Benchmark function the autotuner times candidates with (None: Triton's do_bench). Tests under the interpreter
# put a deterministic stand-in here.
AUTOTUNE_BENCH = None
_autotuners: dict = {}


def autotune_enabled() -> bool:
    """Autotune kernels that have no tuned config, at their first call, only when asked (SPECGEN_AUTOTUNE=1) and on a
    GPU. By default the plan's configs run: an unseen spec must not spend minutes tuning at its first call
    (docs/tuning.md); `specgen tune` writes a record that later builds bake in."""
    return (os.environ.get("SPECGEN_AUTOTUNE", "0") == "1" and not interpreting() and torch.cuda.is_available())


def tune_bucket(T: int) -> int:
    """The autotuner's shape key: sequence lengths within a power of two share one tuning."""
    return max(16, 1 << max(0, int(T) - 1).bit_length())


class _DropBucket:
    """The kernel as the autotuner sees it: the same JIT function, whose `run` drops the `tune_bucket` key argument
    (an autotuner key that is not a kernel argument, so lengths are bucketed without recompiling per length)."""

    def __init__(self, fn):
        self.fn = fn
        self.arg_names = fn.arg_names

    def run(self, *args, tune_bucket=None, **kwargs):
        return self.fn.run(*args, **kwargs)


def _autotuner(kernel, name: str, candidates: list, restore: tuple):
    key = (kernel, name, restore)
    tuner = _autotuners.get(key)
    if tuner is None:
        import triton
        from triton.runtime.autotuner import Autotuner

        configs = [triton.Config({META_NAMES[k]: v for k, v in c.items() if k in META_NAMES},
                                 num_warps=c["num_warps"], num_stages=c["num_stages"]) for c in candidates]
        # Outputs the kernel accumulates into are restored after every timed run, so tuning never changes results;
        # timings are cached on disk (Triton's cache) per kernel source, candidate list, bucket and dtypes.
        tuner = Autotuner(_DropBucket(kernel), kernel.arg_names + ["tune_bucket"], configs, key=["tune_bucket"],
                          reset_to_zero=None, restore_value=list(restore), do_bench=AUTOTUNE_BENCH,
                          cache_results=True)
        _autotuners[key] = tuner
    return tuner


def launch(kernel, name: str, configs: dict, candidates: dict, grid, args: tuple, meta: dict, *, T: int,
           restore: tuple = ()) -> dict | None:
    """Launch `kernel` (config entry `name`) with the tuned config of this GPU if the module has one; else, with
    autotuning on and more than one candidate, let Triton's autotuner pick among `candidates[name]` (pruned by the
    footprint model when the module was built), keyed by the length's bucket; else the plan's default.

    `grid(cfg)` gives the launch grid of a config, `meta` the kernel's other keyword arguments, `restore` the names
    of the arguments the kernel accumulates into. Returns the config launched (None when the autotuner chose).
    """
    cfg = tuned_config(configs, name)
    pool = candidates.get(name, ())
    if cfg is None and len(pool) > 1 and (autotune_enabled() or AUTOTUNE_BENCH is not None):
        tuner = _autotuner(kernel, name, pool, tuple(restore))
        fixed = pool[0]

        def tuned_grid(m):
            return grid({**fixed, **{k: m[v] for k, v in META_NAMES.items() if v in m},
                         "num_warps": m.get("num_warps"), "num_stages": m.get("num_stages")})

        tuner[tuned_grid](*args, tune_bucket=tune_bucket(T), **meta)
        return None
    cfg = cfg if cfg is not None else configs["default"][name]
    launch_with(kernel, grid(cfg), args, meta, cfg)
    return cfg


def launch_with(kernel, grid, args: tuple, meta: dict, cfg: dict) -> None:
    """Launch `kernel` on `grid` with one config: its meta-parameters (META_NAMES) as keyword arguments beside
    `meta`, its warps and stages as launch options."""
    kernel[grid](*args, **meta, **{META_NAMES[k]: v for k, v in cfg.items() if k in META_NAMES},
                 num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])


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
        self.cu_seqlens = cu_seqlens
        self._layout = self._seq = self._dst = self._row_ok = None

    # The maps are built on first use (plain attributes: torch.compile traces them): a native packed call
    # (docs/varlen.md) needs only the [total] ones, and `row_ok` alone is [N, max_seqlen].
    @property
    def seq(self) -> torch.Tensor:
        """The sequence of each packed token, [total] (int64)."""
        if self._seq is None:
            cu = self.cu_seqlens.long()
            tok = torch.arange(self.total, device=cu.device)
            # The last start <= tok (right=True skips empty sequences, whose start repeats).
            self._seq = torch.searchsorted(cu, tok, right=True) - 1
        return self._seq

    @property
    def dst(self) -> torch.Tensor:
        """The flat padded row of each packed token, [total] (int64)."""
        if self._dst is None:
            self._dst = self.seq * self.max_seqlen + self.positions()
        return self._dst

    @property
    def row_ok(self) -> torch.Tensor:
        """[N, max_seqlen] bool: the padded rows that hold a token."""
        if self._row_ok is None:
            cu = self.cu_seqlens.long()
            pos = torch.arange(self.max_seqlen, device=cu.device)
            self._row_ok = pos[None, :] < (cu[1:] - cu[:-1])[:, None]
        return self._row_ok

    def token_lengths(self) -> torch.Tensor:
        """Length of each packed token's sequence, [total] (int64)."""
        cu = self.cu_seqlens.long()
        return (cu[1:] - cu[:-1])[self.seq]

    def positions(self) -> torch.Tensor:
        """Position of each packed token within its sequence, [total] (0 at every sequence's start)."""
        return torch.arange(self.total, device=self.cu_seqlens.device) - self.cu_seqlens.long()[self.seq]

    def layout(self):
        """The native kernels' view of this batch (runtime.varlen.Layout: tile tables, pooled-block offsets),
        built once per batch and kept with this map (a model's layers share it)."""
        if self._layout is None:
            from .varlen import Layout

            self._layout = Layout(self.cu_seqlens, self.max_seqlen, self.total, self.seq)
        return self._layout

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


def compiling() -> bool:
    """True while torch.compile traces: the generated training entry points then call their custom ops (traceable,
    with fake implementations); eager calls run the same implementations through a plain autograd.Function."""
    return hasattr(torch, "compiler") and torch.compiler.is_compiling()


def no_host_reads() -> bool:
    """True under torch.compile tracing or CUDA graph capture: values on the device must not be read on the host."""
    return _no_host_reads()


def _no_host_reads() -> bool:
    """Under torch.compile or while a CUDA graph is captured, reading a tensor on the host is not allowed."""
    return compiling() or (torch.cuda.is_available() and torch.cuda.is_current_stream_capturing())


def check_varlen(fn: str, cu_seqlens, max_seqlen, total: int, device: torch.device, spec_max_seqlen: int,
                 spec_name: str) -> Packed:
    """Check a packed batch's cu_seqlens and max_seqlen and return its pad/unpad map.

    The values of cu_seqlens are checked too (starts at 0, non-decreasing, ends at `total`, no sequence longer
    than max_seqlen): that reads them on the host. A model passes the same cu_seqlens to every layer, so the last
    checked tensor and its map are kept: the same tensor object, unmodified (its in-place version counter), with
    the same max_seqlen and total, is not read again. Under torch.compile or CUDA graph capture the values are not
    read (no graph break, no sync); as with flash-attn, wrong values are then the caller's bug.
    """
    global _last_varlen
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
    if isinstance(max_seqlen, torch.Tensor) and max_seqlen.numel() == 1 and not _no_host_reads():
        max_seqlen = int(max_seqlen)
    elif not isinstance(max_seqlen, (int, torch.SymInt, torch.Tensor)) and hasattr(max_seqlen, "__index__"):
        max_seqlen = operator.index(max_seqlen)  # numpy integers
    # (torch.compile may pass a SymInt: a size it traces symbolically.)
    if not isinstance(max_seqlen, (int, torch.SymInt)) or isinstance(max_seqlen, bool) or max_seqlen < 1:
        raise ArgumentError(f"{fn}: argument `max_seqlen` must be a positive int (the longest sequence's length), "
                            f"got {max_seqlen!r}")
    if max_seqlen > spec_max_seqlen:
        raise ArgumentError(f"{fn}: argument `max_seqlen`={max_seqlen} exceeds the spec's max_seqlen={spec_max_seqlen} "
                            f"(spec {spec_name}); raise max_seqlen in the spec and rebuild")
    if not _no_host_reads():
        key = (cu_seqlens._version, max_seqlen, total, spec_max_seqlen)
        if _last_varlen is not None and _last_varlen[0] is cu_seqlens and _last_varlen[1] == key:
            return _last_varlen[2]
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
        packed = Packed(cu_seqlens, max_seqlen, total)
        # The tensor itself is held, so its address cannot be reused by another tensor while it is the key.
        _last_varlen = (cu_seqlens, key, packed)
        return packed
    return Packed(cu_seqlens, max_seqlen, total)


_last_varlen = None  # (cu_seqlens, (version, max_seqlen, total, spec max), Packed) of the last checked batch


def packed_map(cu_seqlens: torch.Tensor, max_seqlen: int, total: int) -> Packed:
    """The map of an already checked packed batch, where only its tensors reach the code (the training custom ops):
    the map check_varlen last kept when it is this tensor, unmodified (so the forward, the backward and every layer
    share its tile tables), else a new one."""
    last = _last_varlen
    if (last is not None and last[0] is cu_seqlens and last[1][0] == cu_seqlens._version
            and last[1][1:3] == (max_seqlen, total)):
        return last[2]
    return Packed(cu_seqlens, max_seqlen, total)


FP8_MAX = 448.0  # largest finite float8_e4m3fn
FP8_CHUNK_ELEMENTS = 1 << 24
# GPU tensors of these dtypes take runtime.fp8's one-launch kernel (the same bits); the torch form below is the
# CPU's, float64 references' and the kernel's tests' reference.
FP8_KERNEL_DTYPES = (torch.bfloat16, torch.float16, torch.float32)


def fp8_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x quantised to float8_e4m3fn row by row (over the last dim): (x8, scale fp32 [...]) with x ~ x8 * scale.

    scale = amax(|row|) / 448, so every row uses the whole e4m3 range; an all-zero row gets scale 1. Computed in
    fp32 (exact for bf16 inputs) by torch's round-to-nearest-even cast, the one rounding that the kernels, the
    decode cache and the float64 reference all share through this function, on whichever device: the scale is the
    correctly rounded fp32 quotient everywhere (see below), so a GPU's rows equal the CPU reference's bit for bit.
    """
    if x.is_cuda and x.dtype in FP8_KERNEL_DTYPES:
        return fp8.rows(x)   # the same bits in one launch (runtime.fp8)
    rows = x.reshape(-1, x.shape[-1])
    x8 = torch.empty(rows.shape, dtype=torch.float8_e4m3fn, device=x.device)
    scale = torch.empty(rows.shape[0], dtype=torch.float32, device=x.device)
    # Chunks of rows bound the fp32 temporaries (a whole 64k-token q_I in fp32 would be 2 GiB).
    step = max(1, FP8_CHUNK_ELEMENTS // max(1, rows.shape[1]))
    for r0 in range(0, rows.shape[0], step):
        xf = rows[r0:r0 + step].float()
        amax = xf.abs().amax(dim=-1)
        # A tensor divisor, not the Python float: torch on CUDA divides by a host scalar as a product with its fp32
        # reciprocal, an ulp off the quotient for more than half the rows, where the CPU divides. bf16 rows over a
        # bf16 amax often land exactly on an e4m3 rounding tie, which an ulp in the scale then breaks the other way:
        # ~0.1% of the elements moved by an e4m3 ulp (6-12%), and dsa_v32's index scores on the GPU missed the CPU
        # reference by 2e-3 to 1e-2 (the H200's 3.23e-3 failure of 2026-12-07, reproduced on the CPU).
        s = torch.where(amax > 0, amax / torch.full_like(amax, FP8_MAX), torch.ones_like(amax))
        x8[r0:r0 + step] = (xf / s.unsqueeze(-1)).to(torch.float8_e4m3fn)
        scale[r0:r0 + step] = s
    return x8.view(x.shape), scale.view(x.shape[:-1])


def fp8_index_queries(q_idx: torch.Tensor, w_idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Indexer queries [..., H_I, d_I] rounded to e4m3 per (token, head) by fp8_rows, and the head weights
    [..., H_I] with those row scales folded in (fp32): the scales are positive, so they pass through the ReLU."""
    if q_idx.is_cuda and q_idx.dtype in FP8_KERNEL_DTYPES:
        return fp8.rows(q_idx, w_idx)
    q8, scale = fp8_rows(q_idx)
    return q8, w_idx.float() * scale


def require_fp8(fn: str, device: torch.device) -> None:
    """fp8 dots need sm89+ (Ada, Hopper); the CPU interpreter emulates them."""
    if device.type == "cuda" and torch.cuda.get_device_capability(device) < (8, 9):
        raise ArgumentError(f"{fn}: the spec's indexer runs in fp8_e4m3, which needs a GPU of compute capability "
                            f"8.9 or newer (this is {torch.cuda.get_device_name(device)}); build a spec with "
                            f"indexer.dtype: bf16")

# -- decoding: cache and step checks (host-side only, so a step needs no device synchronisation) ---------------

def check_q_len(fn: str, q_len: int, max_q_len: int, spec_name: str) -> None:
    if not 1 <= q_len <= max_q_len:
        raise ArgumentError(f"{fn}: q_len={q_len} new tokens per step, but the spec allows 1..{max_q_len} "
                            f"(decode.max_q_len of spec {spec_name}); raise decode.max_q_len and rebuild, or split "
                            f"the step")


def check_block_table(fn: str, table, batch: int, num_pages: int, device, sync: bool = True) -> torch.Tensor:
    """An int32 [batch, max_pages] page table. With `sync` (cache construction, not inside a step) its entries are
    read back once and must lie in [0, num_pages), with -1 allowed for unused trailing entries."""
    if not isinstance(table, torch.Tensor) or table.dim() != 2 or table.shape[0] != batch or table.dtype != torch.int32:
        got = f"{_fmt(tuple(table.shape))} {table.dtype}" if isinstance(table, torch.Tensor) else type(table).__name__
        raise ArgumentError(f"{fn}: argument `block_table` must be int32 of shape [{batch}, max_pages], got {got}")
    num_pages = check_count(fn, "num_pages", num_pages)
    if table.device != as_device(device):
        raise ArgumentError(f"{fn}: argument `block_table` is on {table.device}, the cache on {device}; "
                            f"move it to the cache's device")
    if table.shape[1] < 1:
        raise ArgumentError(f"{fn}: argument `block_table` has no columns; list at least one page per sequence")
    if sync:
        host = table.cpu()
        bad = (host >= num_pages) | (host < -1)
        if bad.any():
            b, j = (int(x) for x in bad.nonzero()[0])
            raise ArgumentError(f"{fn}: block_table[{b}, {j}] = {int(host[b, j])} points past the pool of "
                                f"{num_pages} pages; entries must lie in [0, {num_pages}) (-1: unused)")
        used = host >= 0
        gap = (~used[:, :-1] & used[:, 1:]).any(dim=1)
        if gap.any():
            b = int(gap.nonzero()[0])
            raise ArgumentError(f"{fn}: block_table row {b} has a -1 before a valid page; list a sequence's pages "
                                f"first and put -1 only at the end")
        pages = host[used]
        if pages.unique().numel() != pages.numel():
            values, counts = pages.unique(return_counts=True)
            raise ArgumentError(f"{fn}: page {int(values[counts > 1][0])} is listed more than once in block_table; "
                                f"each page may belong to one sequence position only (appends would overwrite)")
    return table.contiguous()


def page_capacity(table: torch.Tensor, page_size: int) -> list[int]:
    """Tokens each sequence's pages hold (its leading valid entries x page_size)."""
    return [int(n) * page_size for n in (table.cpu() >= 0).sum(dim=1)]


def host_lengths(fn: str, seqlens, batch: int, T: int) -> list[int]:
    """Prompt lengths as host ints (a list, or a tensor read back once, outside any step)."""
    if seqlens is None:
        return [T] * batch
    values = seqlens.tolist() if isinstance(seqlens, torch.Tensor) else list(seqlens)
    if len(values) != batch or any(not isinstance(x, int) or not 0 <= x <= T for x in values):
        raise ArgumentError(f"{fn}: `seqlens` must be {batch} ints in [0, {T}] (each prompt's length within the "
                            f"[batch, T] tensors), got {values}")
    return values


def check_fits(fn: str, lengths: list[int], capacity: list[int]) -> None:
    for b, (n, cap) in enumerate(zip(lengths, capacity)):
        if n > cap:
            raise ArgumentError(f"{fn}: sequence {b} would hold {n} tokens but its pages hold {cap}; give it more "
                                f"pages in the block table (or a larger max_seqlen for a contiguous cache)")


def check_queries_fit(fn: str, q_len: int, lengths: list[int]) -> None:
    for b, n in enumerate(lengths):
        if n < q_len:
            raise ArgumentError(f"{fn}: sequence {b} holds {n} tokens but the step has q_len={q_len} queries; "
                                f"append the new tokens to the cache (cache.append) before decoding")


def check_seqlens_arg(fn: str, seqlens, batch: int, device) -> torch.Tensor:
    if not isinstance(seqlens, torch.Tensor) or tuple(seqlens.shape) != (batch,) or seqlens.dtype != torch.int32:
        got = f"{_fmt(tuple(seqlens.shape))} {seqlens.dtype}" if isinstance(seqlens, torch.Tensor) else type(seqlens).__name__
        raise ArgumentError(f"{fn}: argument `cache_seqlens` must be int32 of shape [{batch}], got {got}")
    if seqlens.device != as_device(device):
        raise ArgumentError(f"{fn}: argument `cache_seqlens` is on {seqlens.device}, the cache on {device}; "
                            f"move it to the cache's device")
    return seqlens.contiguous()


_sm_counts: dict = {}


def decode_splits(programs: int, max_tiles: int, device, waves: int = 2, cap: int = 64,
                  resident: int | None = None) -> int:
    """Key-range splits per decode program (flash-decoding): enough programs for about `waves` waves of the
    GPU's SMs, never more splits than key tiles, at most `cap` (the plan's split_waves / max_splits). With
    `resident` (programs of the kernel one SM holds at once, from its registers and shared memory: the compression
    forms', decode_step.CMP_FORMS) instead: `splits_in_one_round`. Off the GPU: always 2 (an empty split is
    legal), so the CPU tests exercise the merge, also for branches whose keys fit one tile."""
    device = torch.device(device)
    if device.type != "cuda":
        return 2
    if resident:
        return splits_in_one_round(programs, max_tiles, resident * _sm_count(device), cap)
    return max(1, min(-(-waves * _sm_count(device) // max(programs, 1)), max_tiles, cap))


def splits_in_one_round(programs: int, max_tiles: int, slots: int, cap: int) -> int:
    """As many splits as let every program run at once on `slots` (SMs x programs resident per SM), at least 1,
    at most one per key tile and `cap`; then as few as give each split the same whole number of tiles at full
    capacity (128 tiles in 99 splits are 2 tiles a split, 64 of them non-empty: launch 64). A bandwidth-bound
    kernel whose programs all start together and do equal work finishes together: no second, partly filled round
    (at batch 64 the ceil rule's two waves of 2 x 132 programs were 512 programs on 264 slots)."""
    s = max(1, min(slots // max(programs, 1), max_tiles, cap))
    return -(-max_tiles // -(-max_tiles // s)) if max_tiles > 0 else s


def _sm_count(device: torch.device) -> int:
    index = device.index if device.index is not None else torch.cuda.current_device()
    sms = _sm_counts.get(index)
    if sms is None:
        sms = _sm_counts[index] = torch.cuda.get_device_properties(index).multi_processor_count
    return sms


def decode_combine_tiles(rows: int, dv: int, max_splits: int, device, sb_cap: int = 8) -> tuple[int, int, int, int]:
    """Tiles of the decode epilogue (`_decode_combine_kernel`): (rows, value columns, splits loaded at once,
    num_warps). On the GPU with rows enough for every SM: 16 rows, 128 columns, one split at a time. Else (batch
    1: a few dozen rows, up to 64 splits per branch) row tiles shrink from 16 to 2 and column tiles from 64 to 16
    until there are two programs per SM, each loading up to `sb_cap` splits at once (the descriptor's combine_sb:
    each load round is a dependent trip to memory, two per branch). Off the GPU: 16 rows and two column tiles when
    DV allows, so the CPU tests exercise the column masks; both split paths by the split count (the CPU decode has
    2 splits per branch, 3-D tiles; more take the 2-D path)."""
    sb = min(sb_cap, max(2, 1 << max(0, max_splits - 1).bit_length()))
    dv_pow2 = 1 << max(0, dv - 1).bit_length()
    device = torch.device(device)
    if device.type != "cuda":
        return 16, max(16, dv_pow2 // 2), (1 if max_splits > 2 else sb), 4
    sms = _sm_count(device)
    if -(-rows // 16) >= sms:
        # The rows alone fill the GPU (large batches, few splits): 2-D tiles, one split at a time; 3-D tiles of
        # SB splits ran slower there (42 us against 22 us for DSA V3.2 at batch 64).
        bd = min(128, dv_pow2)
        return 16, bd, 1, 4 if 16 * bd >= 2048 else 2
    target = 2 * sms
    br, bd = 16, min(64, dv_pow2)
    while br > 2 and -(-rows // br) * -(-dv // bd) < target:
        br //= 2
    while bd > 16 and -(-rows // br) * -(-dv // bd) < target:
        bd //= 2
    elems = sb * br * bd
    return br, bd, sb, 4 if elems >= 4096 else 2 if elems >= 1024 else 1


# ---------------------------------------------------------------------------------------------------------------
# Decoding: constructor arguments, and the step's device-side guard (docs/decode.md, "What is checked where")
# ---------------------------------------------------------------------------------------------------------------

# Positions are int32 in the kernels: a sequence holds fewer than 2**31 tokens.
MAX_TOKENS = 2**31 - 1


def check_count(fn: str, name: str, value, minimum: int = 1, maximum: int = MAX_TOKENS) -> int:
    """A size argument: a Python (or numpy) int in [minimum, maximum], never a bool, float or tensor."""
    if not isinstance(value, int) and not isinstance(value, (bool, float, torch.Tensor)) and hasattr(value, "__index__"):
        value = operator.index(value)  # numpy integers
    if isinstance(value, bool) or not isinstance(value, int):
        raise ArgumentError(f"{fn}: argument `{name}` must be an int, got {value!r} ({type(value).__name__}); "
                            f"pass a positive whole number")
    if not minimum <= value <= maximum:
        raise ArgumentError(f"{fn}: argument `{name}` must lie in [{minimum}, {maximum}], got {value}")
    return value


def check_device(fn: str, device) -> torch.device:
    """The cache's `device`: a torch.device, a string such as "cuda:0" or "cpu", or a CUDA index; one that exists."""
    if isinstance(device, bool) or not isinstance(device, (str, int, torch.device)):
        raise ArgumentError(f"{fn}: argument `device` must be a torch.device, a str such as \"cuda\" or \"cpu\", or "
                            f"a CUDA device index, got {type(device).__name__}")
    try:
        device = torch.device(device)
    except (RuntimeError, TypeError, ValueError) as e:
        raise ArgumentError(f"{fn}: argument `device` is not a device: {device!r} ({e}); pass e.g. \"cuda\" or "
                            f"\"cpu\"") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ArgumentError(f"{fn}: argument `device` is {device} but CUDA is not available here; pass "
                                f"device=\"cpu\" (the Triton interpreter) or run on a GPU")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ArgumentError(f"{fn}: argument `device` is {device} but there are {torch.cuda.device_count()} "
                                f"CUDA devices")
    elif device.type != "cpu":
        raise ArgumentError(f"{fn}: argument `device` is {device}; the kernels run on \"cuda\" (or \"cpu\" under "
                            f"the Triton interpreter)")
    return as_device(device)


def check_cache_args(fn: str, batch, max_seqlen, num_pages, block_table, device) -> tuple:
    """The layout arguments of a decode cache's constructor: (batch, max_seqlen, num_pages, device), each checked
    for type and range, with exactly one layout (max_seqlen: contiguous; num_pages [+ block_table]: paged)."""
    batch = check_count(fn, "batch", batch)
    if max_seqlen is not None and num_pages is not None:
        raise ArgumentError(f"{fn}: both `max_seqlen` (contiguous cache) and `num_pages` (paged cache) were given; "
                            f"pass one of them")
    if block_table is not None and num_pages is None:
        raise ArgumentError(f"{fn}: argument `block_table` was given without `num_pages`; a paged cache needs "
                            f"num_pages (the pool's size) too")
    if num_pages is None:
        if max_seqlen is None:
            raise ArgumentError(f"{fn}: a contiguous cache needs `max_seqlen` (tokens per sequence), got None; or "
                                f"pass num_pages for a paged cache")
        max_seqlen = check_count(fn, "max_seqlen", max_seqlen)
    else:
        num_pages = check_count(fn, "num_pages", num_pages)
    if device is not None:
        device = check_device(fn, device)
    elif block_table is not None and isinstance(block_table, torch.Tensor):
        device = as_device(block_table.device)
    else:
        device = torch.device("cpu")
    if batch * (max_seqlen or 1) > MAX_TOKENS:
        raise ArgumentError(f"{fn}: `batch` x `max_seqlen` = {batch * max_seqlen} rows exceed the kernels' int32 "
                            f"row index; use a paged cache")
    return batch, max_seqlen, num_pages, device


def check_fixed(fn: str, name: str, value, expected, field: str, spec_name: str) -> None:
    """An optional argument that must equal what the spec fixed (a cache's page_size or dtype)."""
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, type(expected)) or value != expected:
        raise ArgumentError(f"{fn}: argument `{name}` is {value!r} but spec {spec_name} fixes {field} = {expected}; "
                            f"omit `{name}` or build a spec with {field}: {value!r}")


# Bits of a decode cache's device-side error flag (`cache.error_flag`, int32 [1]): set by a step whose explicit
# `cache_seqlens` / `block_table` hold values known only on the device (a CUDA tensor: reading it would
# synchronise) that are out of range. The step clamps them, so no kernel reads or writes outside its buffers, and
# its output is then meaningless; `raise_if_flagged(cache)` (or `cache.check_errors()`) raises it.
FLAG_SEQLENS = 1
FLAG_BLOCK_TABLE = 2
FLAG_CAPACITY = 4
FLAG_TEXT = {
    FLAG_SEQLENS: "`cache_seqlens` held a length outside [q_len, the tokens the cache holds] (clamped)",
    FLAG_BLOCK_TABLE: "`block_table` held a page outside [0, num_pages) within a sequence's length (read as page 0)",
    FLAG_CAPACITY: "`append` ran a sequence past its capacity inside a CUDA graph (tokens past it dropped onto its "
                   "last slot)",
}


def host_readable(x: torch.Tensor) -> bool:
    """The tensor's values can be read on the host without synchronising with a device (a CPU tensor, outside
    torch.compile tracing)."""
    return x.device.type == "cpu" and not compiling()


def guard_cache_seqlens(fn: str, seqlens: torch.Tensor, q_len: int, held: torch.Tensor, held_host: list[int],
                        flag: torch.Tensor, host: bool | None = None) -> torch.Tensor:
    """An explicit `cache_seqlens` [B] int32: every length must lie in [q_len, the tokens the cache holds]
    (`held`, the cache's device lengths; `held_host` their host mirror). Host-readable values are checked now
    (ArgumentError); otherwise the check runs on the device without a sync: an out-of-range length sets
    FLAG_SEQLENS in `flag` and is clamped into [0, held], so the kernels stay inside the cache."""
    if host is None:
        host = host_readable(seqlens)
    if host:
        for b, (n, cap) in enumerate(zip(seqlens.tolist(), held_host)):
            if not q_len <= n <= cap:
                raise ArgumentError(f"{fn}: cache_seqlens[{b}] = {n} is outside [{q_len}, {cap}]: sequence {b} holds "
                                    f"{cap} tokens and the step has q_len={q_len} queries; pass lengths the cache "
                                    f"holds (new tokens included), or omit `cache_seqlens` to use the cache's own")
        return seqlens
    bad = (seqlens < q_len) | (seqlens > held)
    flag.bitwise_or_(bad.any().to(torch.int32) * FLAG_SEQLENS)
    return torch.minimum(seqlens.clamp(min=0), held).to(torch.int32)


def guard_block_table(fn: str, table: torch.Tensor, seqlens: torch.Tensor, num_pages: int, page_size: int,
                      flag: torch.Tensor, host: bool | None = None) -> torch.Tensor:
    """An explicit `block_table` [B, max_pages] int32: the entries a sequence's length reaches (the first
    cdiv(seqlens[b], page_size)) must be pages in [0, num_pages). Host-readable tables are checked now
    (ArgumentError); otherwise on the device without a sync: a bad entry sets FLAG_BLOCK_TABLE in `flag` and every
    entry outside the pool reads as page 0, so the kernels stay inside the cache."""
    if host is None:
        host = host_readable(table) and host_readable(seqlens)
    cols = torch.arange(table.shape[1], device=table.device)
    needed = cols[None, :] < ((seqlens.long() + page_size - 1) // page_size)[:, None]
    outside = (table < 0) | (table >= num_pages)
    if host:
        bad = needed & outside
        if bad.any():
            b, j = (int(x) for x in bad.nonzero()[0])
            raise ArgumentError(f"{fn}: block_table[{b}, {j}] = {int(table[b, j])} is outside the pool of {num_pages} "
                                f"pages, but sequence {b}'s length reaches it; entries must lie in [0, {num_pages}) "
                                f"(-1 only past a sequence's pages)")
        return table
    flag.bitwise_or_((needed & outside).any().to(torch.int32) * FLAG_BLOCK_TABLE)
    return torch.where(outside, 0, table).to(torch.int32)


def raise_if_flagged(cache) -> None:
    """Raise ArgumentError if a decode step on `cache` flagged an argument on the device (see FLAG_TEXT), and
    clear the flag. Reads the flag on the host: a synchronisation, so call it where one is acceptable (after a
    graph replay, every N steps, at the end of a request), never inside a captured region."""
    flag = cache.error_flag
    bits = int(flag.item())
    if bits:
        flag.zero_()
        what = "; ".join(text for bit, text in FLAG_TEXT.items() if bits & bit)
        raise ArgumentError(f"{type(cache).__name__}: a decode step was given out-of-range arguments: {what}; the "
                            f"outputs of the steps since the last check are not meaningful; pass lengths the cache "
                            f"holds and pages of its pool")


def as_device(device) -> torch.device:
    """A torch.device with its index made explicit ("cuda" -> "cuda:<current>"), so it compares equal to the device
    of the tensors that live there (torch.device("cuda") != torch.device("cuda:0"))."""
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        return torch.device("cuda", torch.cuda.current_device())
    return device


class SchemaMismatch(ImportError):
    """A generated module rendered for another runtime schema than the installed specgen's."""


def require_schema(schema: int, spec_name: str) -> None:
    """Called first by every generated module: a committed or cached module that meets a newer (or older) runtime
    fails at import with one line saying to rebuild it, rather than deep inside a call."""
    from specgen import RUNTIME_SCHEMA

    if schema != RUNTIME_SCHEMA:
        raise SchemaMismatch(
            f"generated module of spec `{spec_name}` was rendered for runtime schema {schema}, but the installed "
            f"specgen runtime has schema {RUNTIME_SCHEMA}: rebuild it (`specgen build SPEC`; specgen.load rebuilds "
            f"into a new cache key by itself)")


# The host code generated modules delegate to, one concern per module (they import the names above, so they come
# last): the descriptor a generated module fills, argument checks, varlen packing, the inference entry point,
# custom ops and autograd, the backward's plain-torch pieces, the launch sequences' host side, the layer, the
# indexer's top-k and its distillation loss. Generated code reaches them as `runtime.<module>`.
from . import descriptor, checks, varlen, inference, autograd, backward, launches, layer, indexer  # noqa: E402,F401  isort: skip
from . import distill, selection, fp8  # noqa: E402,F401  isort: skip

# Decoding: decode_descriptor (the table), decode_cache (the KV cache), decode_step (the step driver), loaded on
# first use, so importing this file stays light (decode_step imports triton).
_SUBMODULES = ("decode_descriptor", "decode_cache", "decode_step", "prefill")


def __getattr__(name: str):
    if name in _SUBMODULES:
        import importlib  # lazy: see _SUBMODULES

        return importlib.import_module(f"{__name__}.{name}")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
