"""specgen: a compiler-style generator of sparse-attention Triton kernels from YAML specs."""

__version__ = "0.1.0"

# The contract between a generated module and specgen.runtime (descriptor fields, the runtime functions it calls).
# Rendered into every module; the runtime refuses a module of another schema at import, with the fix (rebuild).
# Bump it with any runtime change that modules rendered before it cannot meet, and when modules start to need runtime
# functions or descriptor fields an older runtime lacks (2: runtime.launches, Descriptor.softmax_scale; 3: native
# packed forwards, Descriptor.native_varlen and `_forward(..., varlen=)`, the kernels' packed tile tables; 4: the
# selection backward's scatter path, Descriptor.selection_backward and runtime.launches.Backward.selection; 5: the
# decode selection scored from per-tile partials, DecodeDescriptor's scoring fields; 6: native packed backwards,
# `_backward(..., varlen=)` and the backward kernels' packed tile tables; 7: the indexer's key-major score tile and
# compacting top-k, runtime.indexer.select reading its launch configs from the module's table; 8: native packed
# distillation, the distillation custom ops take (cu_seqlens, max_seqlen) instead of a row mask,
# runtime.distill.Launches and inverse_index take the layout; 9: chunked prefill into a cache, the forward kernels'
# PREFILL constexpr (per-sequence query offset and key rows), runtime.prefill and `<family>_prefill`; 10: the fused
# distillation path, DistillPlan.path and the stored target p of the sparse stage; 11: the block-outer selection
# backward's launch config `selection_kv_bwd`, which runtime.launches.Backward.selection_kv reads from the module's
# CONFIGS, and the kernel's BQ / KEY_MAJOR constexprs; 12: the distillation custom ops come from
# runtime.distill.custom_ops, registered once per process and named with a digest of the tiles; 13: the selection
# forward's launch-config fields `key_split` / `prefetch`, which runtime.launch_with passes as the kernel's
# KEY_SPLIT / PREFETCH constexprs; 14: a forward of one ungated branch returns no branch outputs from its custom op
# (the autograd rule saves `out` in their place) and one branch's backward writes dQ in the spec's dtype; the
# attention custom ops' names carry the schema, so torch.compile's on-disk caches never reuse a graph compiled
# against former outputs); 15: the DSA decode step's kernel forms (DecodeDescriptor.selection_form / index_form) and
# the NSA decode's fused launch form; 16: the scatter backward's launch-config field `gp` (head rows a program),
# which runtime.launch_with passes as the kernel's GP constexpr and runtime.launches.Backward.selection_scatter sizes
# its grid by, beside its `key_split` / `prefetch` forms; 17: the indexer top-k's decode forms
# (DecodeDescriptor.topk_form), the decode index-score kernels' H0 argument and FOLD constexpr, the top-k hist
# kernel's H0 argument; 18: the distillation launches' `fwd_form` (runtime.distill.Launches, the sparse fused
# forward's FORM constexpr); 19: the compression-scored decode's top-n forms (DecodeDescriptor.topn_form,
# topn_chunks_kernel / topn_merge_kernel) and the fused select-merge kernel's CAND / TICKETS / NCH arguments and
# CHUNKED / CB / NCH_PAD / TICKET constexprs; 20: the compression kernel's launch forms (DecodeDescriptor.cmp_form,
# runtime.decode_splits' `resident`); 21: the distillation launches' `dense_fwd_form`, `dense_dq_form` and
# `dense_forms` (runtime.distill.Launches, the dense register-operand kernels fwd_dense_qreg / dq_dense_qreg and
# their BK / STAGES / QSMEM constexprs), and, merged under the same number before any module of 21 left the
# session, the kv-order passes' `worklist` argument (runtime.launches' Forward.selection_kv / Backward.selection_kv,
# runtime.worklist) and the scatter backward's split form (Backward.selection's `dkdv_once_kernel`, the launch-config
# fields `reload` / `dkdv_once` / `dkdv_block_n` / `dkdv_warps` / `dkdv_stages`, the scatter kernel's DKDV / RELOAD
# constexprs); 22: the compression-scored decode's launch forms "whole" and "auto" (DecodeDescriptor.whole_kernel,
# runtime.decode_whole) and the bodies the branch kernels, the epilogue and the row top-n now call
# (`_decode_<branch>_body`, `_decode_combine_tile`, `_decode_select_partials_row`); 23: the decode launch chain
# (DecodeDescriptor.chain, the kernels' PDL constexpr); 24: the decode launch form "persist"
# (DecodeDescriptor.persist_kernel, a keyword a module of 24 passes and an older runtime rejects;
# runtime.decode_persist; the NSA cache's persist_counters) and `_decode_combine_tile`'s CG constexpr; 25: the
# attention backward's `distill_p` (the scatter and dq kernels' P_OUT / P_CHUNK / STORE_P, `_backward`'s keyword,
# the custom ops' last argument) and the distillation's `fwd_sparse_from_p` kernel and the one-pass backward's DI_SEL;
# 26: the backward custom op's `distill_p` a required tensor (empty where none: runtime.autograd.no_p), so the op's
# name changes with its schema for torch.compile's on-disk caches; generated modules unchanged beyond the number.
RUNTIME_SCHEMA = 26


def _interpreter_without_gpu_devices() -> None:
    """Triton runs kernels without a GPU only under its CPU interpreter, and TRITON_INTERPRET must be set before
    triton is imported. Where no GPU device exists at all (no NVIDIA, AMD or WSL device files, or macOS), turn it
    on here, so `import specgen` before triton is enough. Checking files keeps `import specgen` free of torch (the
    CLI does not need it); specgen.runtime repeats the check with torch.cuda.is_available() where device files
    exist but no GPU is visible. An explicit TRITON_INTERPRET, even 0, stays as the user set it."""
    import os
    import sys

    if "TRITON_INTERPRET" in os.environ or "triton" in sys.modules:
        return
    if sys.platform == "darwin" or (sys.platform.startswith("linux") and not any(
            os.path.exists(path) for path in ("/dev/nvidiactl", "/dev/nvidia0", "/dev/kfd", "/dev/dxg"))):
        os.environ["TRITON_INTERPRET"] = "1"


_interpreter_without_gpu_devices()


def load(spec, spec_path=None):
    """Build `spec` (a Spec or a YAML path) on first use, cache it by spec hash and tuning record, and return the
    imported module. The tuning record beside the YAML is baked in; for a Spec object, `spec_path` locates it."""
    from .compile.jit import load as _load

    return _load(spec, spec_path)
