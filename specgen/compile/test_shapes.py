"""Which sequence lengths a spec's generated test runs: part of the rendered test, so it lives generator-side."""

from __future__ import annotations

import math

from ..model.spec import Spec


def cpu_seqlens(spec: Spec, small: bool) -> list[int]:
    """Sequence lengths for the CPU interpreter: several awkward ones for small specs, one tiny one otherwise.

    The tiny one (wide heads: every query costs the interpreter most) is 3 tokens past the last of: one selection
    unit (so a second one exists) and, with compression, l + min(unit, d): two complete compression blocks where
    the stride is at most a unit (the compression softmax then has two keys), one for token units. Without
    compression: a unit and 8 tokens."""
    sel, cmp_ = spec.selection, spec.compression
    unit = sel.block if sel else 16
    l = cmp_.block if cmp_ else 8
    if not small:
        if cmp_ is None:
            return [unit + l + 3]
        return [max(unit, l + min(unit, cmp_.stride)) + 3]
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

def _decode_step(spec: Spec, page: bool = True) -> int:
    """Tokens between positions where a compression block, a selection block (and a page) all end at once."""
    sel, cmp_ = spec.selection, spec.compression
    unit = sel.block if sel is not None and sel.granularity == "block" else 1
    return math.lcm(unit, cmp_.stride if cmp_ else 1, spec.decode.page_size if page else 1)


def _has_blocks(spec: Spec) -> bool:
    sel = spec.selection
    return spec.needs_compressed_kv or (sel is not None and sel.granularity == "block")


def decode_prompts(spec: Spec, small: bool, page_boundary: bool = True) -> list[int]:
    """Ragged prompt lengths for the CPU decode tests (every case decodes at least two tokens per sequence):

    - one ending two tokens before the first compression block ends (l - 2): the step's second new token
      completes block 0 (mid-step when q_len > 1), and the first step sees no complete block;
    - one ending one token before a position where a compression block (index >= 1), a selection block and a page
      end together: the first new token completes all three, the next ones start a new page and block;
    - small specs: an empty prompt, one that is a multiple of no block size, and one long enough that top-k drops
      candidates and the window slides, also ending one token short of a page's (and selection block's) end.
    So every case completes at least two compression blocks and one selection block while decoding, contiguous
    and paged (`decode_completions` counts them; a test checks every committed spec). Specs without blocks (token
    selection, no compression) keep a short prompt and a ragged one. `page_boundary=False` (the tier-2 variants,
    whose generated counterparts cover the page case) drops the page from the boundary: a shorter prompt."""
    sel, cmp_ = spec.selection, spec.compression
    unit = sel.block if sel is not None and sel.granularity == "block" else 16
    l = cmp_.block if cmp_ else unit
    step = _decode_step(spec, page_boundary)
    short = l - 2 if cmp_ else max(1, min(l, unit) // 2 - 1)
    if _has_blocks(spec):
        first = l + cmp_.stride if cmp_ else unit
        boundary = -(-first // step) * step - 1
    else:
        boundary = max(l, unit) + 3
    lengths = [short, boundary]
    if small:
        if sel is None:
            long = 2 * max(l, spec.window.size if spec.window else 0) + 3
        elif sel.granularity == "block":
            long = (sel.top_k + 2) * unit + 3
        else:
            long = sel.top_k + 2 * unit + 3
        long = -(-(long + 1) // step) * step - 1
        lengths = [0, short, max(l, unit) + 3, min(long, spec.max_seqlen - 2 * spec.decode.max_q_len * 3)]
    return lengths


def decode_cases(spec: Spec, small: bool) -> list[tuple]:
    """The CPU decode cases (layout, q_len, steps, num_splits, against the prefill kernel too): uneven key splits,
    the default split count (2 on the CPU), and one unsplit multi-token case."""
    q_len = spec.decode.max_q_len if small else min(2, spec.decode.max_q_len)
    return [("contiguous", 1, 2, 3, True), ("paged", 1, 3 if small else 2, None, False), ("paged", q_len, 2, 1, False)]


def decode_completions(spec: Spec, prompts: list[int], q_len: int, steps: int) -> dict:
    """What a decode case's appended tokens complete: compression blocks, selection blocks, and blocks whose end is
    also a page's end, counted over the batch; plus the steps whose q_len tokens cross a compression boundary
    after their first token (a multi-token step across a boundary)."""
    sel, cmp_ = spec.selection, spec.compression
    page = spec.decode.page_size
    out = {"compression": 0, "selection": 0, "page_and_block": 0, "mid_step": 0}
    for n in prompts:
        for k in range(steps * q_len):
            end = n + k + 1  # tokens once position n + k is appended
            cmp_done = cmp_ is not None and end >= cmp_.block and end % cmp_.stride == 0
            sel_done = sel is not None and sel.granularity == "block" and end % sel.block == 0
            out["compression"] += cmp_done
            out["selection"] += sel_done
            out["page_and_block"] += (cmp_done or sel_done) and end % page == 0
            out["mid_step"] += cmp_done and k % q_len > 0
    return out


def decode_gpu_prompts(spec: Spec) -> list[int]:
    """Realistic decode prompts near 64k (or max_seqlen), with room for the steps: one ending one token before a
    compression block, a selection block and a page end together, and a ragged one that ends two tokens before a
    compression block ends (the second new token completes it)."""
    ctx = min(65536, spec.max_seqlen)
    room = 3 * spec.decode.max_q_len + 3
    step = _decode_step(spec)
    first = (ctx - room) // step * step - 1
    if not _has_blocks(spec):
        return [ctx - room, ctx // 2 + 37]
    d = spec.compression.stride if spec.compression else spec.selection.block
    second = ctx // 2 + 37
    second = -(-second // d) * d - 2
    return [first, second]
