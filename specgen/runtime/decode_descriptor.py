"""The decode descriptor: the table a generated module hands the decode runtime (`decode_cache`, `decode_step`).

A generated module keeps the @triton.jit kernels and one `DecodeDescriptor` with its spec's constants, the names
of the tensors its cache stores and the kernel handles; the cache class and the step driver are plain Python here,
parametrised by it (docs/decode.md). Every field is fixed when the module is rendered (the plan's `decode` and
specgen.compile.render.decode_context's names); nothing here is computed per step. This module imports nothing of the
generator.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Optional

import torch


@dataclass(frozen=True, eq=False, slots=True)
class DecodeDescriptor:
    # Names (error messages)
    spec_name: str
    cache_class: str                  # the generated cache class, e.g. "NSACache"
    fn: str                           # the generated decode function, e.g. "nsa_decode"
    # Shapes and dtype
    dtype: torch.dtype
    hq: int
    hkv: int
    group: int                        # query heads per kv group
    dqk: int
    dv: int
    branch_names: tuple[str, ...]     # gate channel order, the order the combine kernel takes the branches in
    softmax_scale: float
    gated: bool
    mla: bool
    # Cache layout
    page_size: int
    max_q_len: int
    cache_tensors: dict[str, int]     # raw per-token tensors the cache stores: name -> last dim
    ring_tensors: tuple[str, ...]     # those kept only as a ring of each sequence's last `ring` tokens
    ring: int
    # Compression: pooled keys (kc) when the spec needs them, values (vc) too with the compression branch
    compressed: bool
    cmp_branch: bool
    cmp_block: int                    # l (0 without compression)
    cmp_stride: int                   # d
    pool_kind: Optional[str]          # "mean" | "linear" | None
    position_embedding: bool
    k_cmp: str                        # the cache tensors the pooling reads
    v_cmp: str
    pool_weights: tuple                # ((name, shape, dtype), ...) of the linear pooling's weights, argument order
    # Selection (scorer None: no selection branch)
    scorer: Optional[str]             # "compression" | "indexer" | None
    scoring: str                      # compression scorer: "partials" | "logits" (plan.decode.scoring); else ""
    overlap_chunks: int               # compression scorer's overlap rule: d-token chunks per selection block,
    overlap_blocks: int               # compression blocks per chunk, and selection blocks a tile's sums spill into
    overlap_spill: int
    sel_block: int                    # l' (1 at token granularity)
    top_k: int
    k_slc: str
    v_slc: str
    # Indexer (DSA, or NSA with indexer-scored selection)
    indexer: bool
    fp8: bool                         # index keys stored as e4m3 with per-(token, kv group) fp32 scales
    idx_heads: int
    idx_dim: int
    idx_scale: Optional[float]
    index_bs: int
    index_hp: int
    # Window (0: no window branch)
    window: int
    k_win: str
    v_win: str
    # Launch configuration of the step's kernels
    split_tiles: dict[str, int]       # keys per tile of each branch's kernel (split sizes)
    split_waves: int                  # split counts: programs for split_waves waves of the SMs, at most max_splits
    max_splits: int
    max_gp: int                       # group heads per program at most
    num_stages: int
    selection_form: str               # the MLA selection kernel's form, decode_step.SELECTION_FORMS
    index_form: str                   # the index-score kernel's form, decode_step.INDEX_FORMS
    topk_form: str                    # the indexer top-k's form, decode_step.TOPK_FORMS
    topn_form: str                    # the compression scorer's top-n form (partials path), decode_step.TOPN_FORMS
    widen: bool                       # the module's WIDEN (bf16 dots widened under the interpreter)
    # Host functions and kernel handles of the generated module
    pool: Optional[Callable]          # the prefill's pooling (the module's `_pool`: pool kernel launch)
    branch_kernels: dict[str, Any]    # branch -> _decode_<branch>_kernel
    combine_kernel: Any
    group_probs_kernel: Any = None    # compression-scored selection
    select_blocks_kernel: Any = None
    select_partials_kernel: Any = None
    index_scores_kernel: Any = None   # indexer-scored selection
    topk_hist_kernel: Any = None
    topk_write_kernel: Any = None
    # The compression-scored step's launch form (plan.decode.form, one of decode_step.LAUNCH_FORMS) and the fused
    # form's kernels ("cmp_win" with a window branch, "select_merge", "selection"; specgen.runtime.decode_fused).
    form: str = "split"
    fused_kernels: Optional[dict] = None
    index_wide_kernel: Any = None     # the index scores' "wide" form
    topn_chunks_kernel: Any = None    # the top-n forms "chunked" / "chunked_ticket" (decode_step.TOPN_FORMS)
    topn_merge_kernel: Any = None
    cmp_form: str = "cmp_base"        # the compression kernel's launch form, decode_step.CMP_FORMS
    whole_kernel: Any = None          # the launch form "whole"'s one kernel (specgen.runtime.decode_whole)
    persist_kernel: Any = None        # the launch form "persist"'s one kernel (specgen.runtime.decode_persist)
    chain: str = "plain"              # how the split / cw forms' launches follow each other, decode_step.CHAINS
    # Splits a program of the epilogue loads at once at most where rows are few (runtime.decode_combine_tiles; a
    # power of two up to 64): at batch 1 each load round is a dependent trip to memory, two a branch; 8 measured
    # (the epilogue 38 -> 8 us at 128k x 1, H100); more untimed (`--decode-forms cs<N>`).
    combine_sb: int = 8

    @property
    def n_branches(self) -> int:
        return len(self.branch_names)


def one_launch_refusal(d: DecodeDescriptor, form: str, kernel, runs: str) -> str | None:
    """Why `d` cannot run a launch form that puts the compression-scored step in one kernel (`form`: "whole",
    "persist"; `kernel` its handle, None where the module has none; `runs`: what that kernel runs), or None: both
    need the compression branch, the partials scoring path and the selection branch's base form."""
    if d.scorer != "compression" or kernel is None or not d.cmp_branch:
        return f"{d.spec_name} has no compression-scored selection with a compression branch (the {form} form {runs})"
    if d.scoring != "partials":
        return f"the {form} form needs the partials scoring path ({d.spec_name} is on {d.scoring!r})"
    if d.selection_form != "base":
        return (f"the {form} form runs the selection branch's base form, not {d.selection_form!r} (its tile and "
                f"stages are the split launch's); use selection form 'base'")
    return None
