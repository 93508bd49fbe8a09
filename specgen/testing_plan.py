"""Which sequence lengths a spec's generated test runs: part of the rendered test, so it lives generator-side."""

from __future__ import annotations

from .spec import Spec


def cpu_seqlens(spec: Spec, small: bool) -> list[int]:
    """Sequence lengths for the CPU interpreter: several awkward ones for small specs, one tiny one otherwise."""
    sel, cmp_ = spec.selection, spec.compression
    unit = sel.block if sel else 16
    l = cmp_.block if cmp_ else 8
    if not small:
        return [unit + l + 3]
    lengths = {1, max(1, l - 2), unit + l // 2 + 1}
    if sel is not None:
        # Long enough that top-n must drop candidates.
        lengths.add(min(spec.max_seqlen, (sel.top_k + 2) * unit + 3))
    return sorted(lengths)


def gpu_seqlens(spec: Spec) -> list[int]:
    """Realistic lengths on the GPU: 8192 and a length that is a multiple of no block size."""
    return [t for t in (8192, 4999) if t <= spec.max_seqlen] or [spec.max_seqlen]


def varlen_seqlens(spec: Spec, small: bool) -> list[int]:
    """Lengths of a packed batch for the CPU varlen tests: an empty sequence, one shorter than every block, and
    lengths that are multiples of no block size. Small specs add one long enough for complete compression blocks,
    several selection blocks and (token granularity) more candidates than top_k. The padded batch costs
    N * max(lengths) rows under the interpreter, so big specs stay tiny."""
    if not small:
        return [7, 0, 2]
    sel = spec.selection
    if sel is not None and sel.granularity == "token":
        first = sel.top_k + 5
    else:
        unit = sel.block if sel else 16
        l = spec.compression.block if spec.compression else 8
        first = unit + l // 2 + 1
    return [min(first, spec.max_seqlen), 0, 5]


def gpu_varlen_seqlens(spec: Spec) -> list[int]:
    """A packed batch of 64k tokens (40000 + 20000 + 5536 + an empty sequence), scaled down to the spec's
    max_seqlen when that is shorter."""
    lengths = [40000, 20000, 5536, 0]
    if spec.max_seqlen >= 40000:
        return lengths
    scale = spec.max_seqlen / 65536
    head = [int(n * scale) for n in lengths[:2]]
    return head + [spec.max_seqlen - sum(head), 0]


def gpu_varlen_backward_seqlens(spec: Spec) -> list[int]:
    """The GPU varlen backward's packed batch: the forward's 64k tokens where the padded fwd+bwd state fits one
    GPU; a quarter of that (16k: 10000, 5000, 1384, 0) for specs as wide as MLA (q heads x head dim > 64 x 192),
    whose padded fp32 dQ alone would take 47 GB at 64k."""
    lengths = gpu_varlen_seqlens(spec)
    if spec.heads.q * spec.head_dim.qk <= 64 * 192:
        return lengths
    head = [n // 4 for n in lengths[:2]]
    return head + [sum(lengths) // 4 - sum(head), 0]

def decode_prompts(spec: Spec, small: bool) -> list[int]:
    """Ragged prompt lengths for the CPU decode tests: one shorter than a compression/selection block, one that is a
    multiple of no block size, and (small specs) an empty prompt and one long enough that top-k drops candidates and
    the window slides, ending one token short of a page's end, so the appends cross into a new page (a multi-token
    step writes across the boundary)."""
    sel, cmp_ = spec.selection, spec.compression
    unit = sel.block if sel is not None and sel.granularity == "block" else 16
    l = cmp_.block if cmp_ else unit
    lengths = [max(1, min(l, unit) // 2 - 1), max(l, unit) + 3]
    if small:
        if sel is None:
            long = 2 * max(l, spec.window.size if spec.window else 0) + 3
        elif sel.granularity == "block":
            long = (sel.top_k + 2) * unit + 3
        else:
            long = sel.top_k + 2 * unit + 3
        page = spec.decode.page_size
        long = -(-(long + 1) // page) * page - 1
        lengths = [0] + lengths + [min(long, spec.max_seqlen - 2 * spec.decode.max_q_len * 3)]
    return lengths


def decode_gpu_prompts(spec: Spec) -> list[int]:
    """Realistic decode prompts: near 64k (or max_seqlen) and a ragged second sequence; room for the steps."""
    ctx = min(65536, spec.max_seqlen)
    room = 3 * spec.decode.max_q_len + 3
    return [ctx - room, ctx // 2 + 37]
