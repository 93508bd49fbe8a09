"""The float64 PyTorch reference: the readable specification every generated kernel is checked against.

Plain torch only (no yaml/jinja/sympy imports here: spec objects are passed in), in the dtype of the inputs, with
queries processed in chunks so it also runs beside a kernel at realistic sizes. Rules: docs/semantics.md.
"""

from .checks import check_selection, rel_err
from .distill import distill_loss, distill_row_kl, distill_target, main_lse
from .indexer import indexer_block_scores, indexer_scale, indexer_scores, select_tokens
from .inputs import input_names, kv_names, make_inputs, make_unabsorbed_qk
from .nsa import (NSAResult, compression_attention, nsa_forward, num_compressed_blocks, overlap_weights, pool_kv,
                  select_blocks, selection_scores, selection_unit, sparse_attention, window_attention)
from .varlen import VarlenResult, distill_loss_varlen, nsa_forward_varlen, query_rows, sequences

__all__ = [
    "NSAResult", "check_selection", "compression_attention", "distill_loss", "distill_row_kl", "distill_target",
    "indexer_block_scores", "indexer_scale",
    "indexer_scores", "input_names", "kv_names", "main_lse", "make_inputs", "make_unabsorbed_qk", "nsa_forward",
    "num_compressed_blocks",
    "overlap_weights", "pool_kv", "rel_err", "select_blocks", "select_tokens", "selection_scores", "selection_unit",
    "sparse_attention", "window_attention",
    "VarlenResult", "distill_loss_varlen", "nsa_forward_varlen", "query_rows", "sequences",
]
