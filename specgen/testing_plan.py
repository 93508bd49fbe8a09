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


def decode_prompts(spec: Spec, small: bool) -> list[int]:
    """Ragged prompt lengths for the CPU decode tests: one shorter than a compression/selection block, one that is a
    multiple of no block size, and (small specs) one long enough that top-k drops candidates and the window slides."""
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
        lengths.append(min(long, spec.max_seqlen - 2 * spec.decode.max_q_len * 3))
    return lengths


def decode_gpu_prompts(spec: Spec) -> list[int]:
    """Realistic decode prompts: near 64k (or max_seqlen) and a ragged second sequence; room for the steps."""
    ctx = min(65536, spec.max_seqlen)
    room = 3 * spec.decode.max_q_len + 3
    return [ctx - room, ctx // 2 + 37]
