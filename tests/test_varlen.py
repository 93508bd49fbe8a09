"""Packed (varlen) batches beyond the example specs (docs/varlen.md): the pad/unpad map and the argument checks of
specgen.runtime, the per-sequence reference, and tier-2 variants no example spec has (a learned linear pool with
position embeddings, whose weights are shared by the sequences; MLA; a spec without a selection branch), plus the
packed call under torch.compile. The example specs' own varlen tests are in generated/test_<name>.py.
"""

from __future__ import annotations

import traceback
import warnings

import pytest
import torch

import specgen
from specgen import reference as R
from specgen import runtime, testing
from specgen.testing import varlen as testing_varlen
from specgen.model.spec import load_spec, replace

SMALL = load_spec("specs/nsa_small.yaml")
LENGTHS = [21, 0, 5]


def small(name: str, **changes):
    return replace(SMALL, name=f"nsa_small_varlen_{name}", **changes)


@pytest.fixture(scope="session", autouse=True)
def _specgen_cache(tmp_path_factory):
    """Build into a temporary cache, never into ~/.cache/specgen."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("SPECGEN_CACHE", str(tmp_path_factory.mktemp("specgen_cache")))
        yield


def test_pad_unpad_map():
    cu = torch.tensor([0, 3, 3, 4, 8], dtype=torch.int32)       # lengths 3, 0, 1, 4
    packed = runtime.check_varlen("f", cu, 5, 8, cu.device, 64, "s")
    x = torch.arange(8.0).view(8, 1).requires_grad_(True)
    padded = packed.pad(x, fill=-1)
    assert padded.shape == (4, 5, 1)
    assert padded[..., 0].tolist() == [[0, 1, 2, -1, -1], [-1] * 5, [3, -1, -1, -1, -1], [4, 5, 6, 7, -1]]
    assert packed.row_ok.tolist() == [[True] * 3 + [False] * 2, [False] * 5, [True] + [False] * 4, [True] * 4 + [False]]
    assert packed.positions().tolist() == [0, 1, 2, 0, 0, 1, 2, 3]
    assert torch.equal(packed.unpad(padded), x)
    (packed.unpad(padded * 2.0)).sum().backward()             # the padding's gradient goes nowhere
    assert x.grad.tolist() == [[2.0]] * 8


def test_check_varlen_errors():
    cu = torch.tensor([0, 3, 8], dtype=torch.int32)
    ok = runtime.check_varlen("f", cu, torch.tensor(5), 8, cu.device, 64, "s")   # a 0-dim max_seqlen is read once
    assert ok.max_seqlen == 5
    cases = [
        (dict(cu_seqlens=None, max_seqlen=5), "`cu_seqlens`"),
        (dict(cu_seqlens=[0, 3, 8], max_seqlen=5), "1-D int32 tensor"),
        (dict(cu_seqlens=torch.tensor([0], dtype=torch.int32), max_seqlen=5), "N >= 1"),
        (dict(cu_seqlens=cu.long(), max_seqlen=5), "int32"),
        (dict(cu_seqlens=cu, max_seqlen=None), "`max_seqlen` is required"),
        (dict(cu_seqlens=cu, max_seqlen=0), "positive int"),
        (dict(cu_seqlens=cu, max_seqlen=5.0), "positive int"),
        (dict(cu_seqlens=cu, max_seqlen=65), "spec's max_seqlen=64"),
        (dict(cu_seqlens=torch.tensor([1, 3, 8], dtype=torch.int32), max_seqlen=5), "start at 0"),
        (dict(cu_seqlens=torch.tensor([0, 5, 3, 8], dtype=torch.int32), max_seqlen=5), "non-decreasing"),
        (dict(cu_seqlens=torch.tensor([0, 3, 7], dtype=torch.int32), max_seqlen=5), "ends at 7"),
        (dict(cu_seqlens=cu, max_seqlen=4), "sequence 1 has 5 tokens"),
    ]
    for kwargs, words in cases:
        with pytest.raises(runtime.ArgumentError, match=words):
            runtime.check_varlen("f", kwargs["cu_seqlens"], kwargs["max_seqlen"], 8, cu.device, 64, "s")


def test_reference_varlen_is_per_sequence():
    """The packed reference (all rows, and the last rows only) equals the batched reference of each sequence."""
    spec = SMALL
    gen = torch.Generator().manual_seed(3)
    lengths = [21, 0, 9]
    inputs = {n: x[0] for n, x in R.make_inputs(spec, 1, sum(lengths), generator=gen).items()}
    cu = torch.tensor([0, 21, 21, 30], dtype=torch.int32)
    full = R.nsa_forward_varlen(spec, cu, **inputs)
    last = R.nsa_forward_varlen(spec, cu, rows=4, **inputs)
    for (a, b), res_rows in zip(((0, 21), (21, 30)), (slice(0, 21), slice(21, 30))):
        alone = R.nsa_forward(spec, **{n: x[a:b][None] for n, x in inputs.items()})
        assert torch.equal(full.out[res_rows], alone.out[0])
        assert torch.equal(full.indices[res_rows], alone.indices[0])
    assert torch.allclose(last.out, torch.cat([full.out[17:21], full.out[26:30]]), rtol=0, atol=1e-12)
    assert R.query_rows(cu, 4).tolist() == [17, 18, 19, 20, 26, 27, 28, 29]


def test_all_sequences_empty():
    """A packed batch of empty sequences: empty results and gradients, a zero distillation-free call, no error."""
    mod = specgen.load(SMALL)
    case = testing_varlen.PackedCase(mod, SMALL, [0, 0], None, 1)
    case.max_seqlen = 1
    out, lse, idx = mod.nsa_forward(**case.inputs, return_lse=True, return_indices=True, **case.varlen())
    assert out.shape == (0, 4, 32) and lse.shape == (0, 4, 3) and idx.shape == (0, 2, 4)
    leaves = {n: x.clone().requires_grad_(True) for n, x in case.inputs.items()}
    mod.nsa_attention(**leaves, **case.varlen()).sum().backward()
    assert all(leaf.grad is not None and leaf.grad.shape == leaf.shape for leaf in leaves.values())


# Tier 2: varlen variants no example spec covers, forward and every gradient against the per-sequence reference.
VARIANTS = {
    "linear_pool_pe_fp32": lambda: small("linear_pool_pe", dtype="fp32", **{
        "compression.pool": "linear", "compression.position_embedding": True}),
    "mla_fp32": lambda: small("mla", dtype="fp32", kv="shared", mla=True, **{"heads.q": 4, "heads.kv": 1}),
    "cmp_win": lambda: small("cmp_win", branches=["compression", "window"], selection=None),
}


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_varlen_matrix(variant):
    spec = VARIANTS[variant]()
    mod = specgen.load(spec)
    testing_varlen.check_forward_varlen(mod, spec, LENGTHS)
    errors = testing_varlen.check_backward_varlen(mod, spec, LENGTHS)
    assert set(errors) == set(testing.differentiable_inputs(spec))


def test_varlen_under_compile():
    """The packed differentiable call compiles to one graph (no value check under torch.compile) and gives the
    eager output and gradients."""
    spec = SMALL
    mod = specgen.load(spec)
    case = testing_varlen.PackedCase(mod, spec, [9, 0, 4], None, 1)
    names = testing.differentiable_inputs(spec)

    def run(fn):
        leaves = {n: x.detach().clone().requires_grad_(n in names) for n, x in case.inputs.items()}
        out = fn(**leaves, **case.varlen())
        out.square().sum().backward()
        return [out.detach()] + [leaves[n].grad for n in names]

    eager = run(mod.nsa_attention)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*torch.jit.*", category=DeprecationWarning)
        compiled = run(torch.compile(mod.nsa_attention, fullgraph=True))
    for a, b in zip(eager, compiled):
        assert torch.equal(a, b)


class _HostReadWatch(torch.Tensor):
    """cu_seqlens as a tensor subclass whose every derived tensor is one too (torch's default __torch_function__
    wraps results), recording each host read of one (tolist, item, truth value, a data-dependent shape...) outside
    Triton's interpreter, which reads every kernel argument on the host where a GPU would not."""
    reads: list = []
    _READS = {"tolist", "item", "__bool__", "__int__", "__index__", "__float__", "__iter__", "numpy", "nonzero",
              "unique", "unique_consecutive", "masked_select", "bincount", "repeat_interleave"}

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        name = getattr(func, "__name__", "")
        if name in cls._READS and not any("triton" in f.filename for f in traceback.extract_stack()):
            if not (name == "repeat_interleave" and (kwargs or {}).get("output_size") is not None):
                cls.reads.append((name, traceback.format_stack(limit=6)[:-1]))
        return super().__torch_function__(func, types, args, kwargs or {})


@pytest.mark.parametrize("path", ["specs/nsa_small.yaml", "specs/dsa_small.yaml"])
def test_packed_calls_read_nothing_on_the_host(path, monkeypatch):
    """Under CUDA-graph capture or torch.compile (runtime.no_host_reads), a packed call reads nothing of cu_seqlens
    or of any tensor made from it on the host: the differentiable call forward and backward, and DSA's index_topk
    and distill_loss. The watch itself is checked first: the eager call's value check (check_varlen) is seen."""
    spec = load_spec(path)
    mod = specgen.load(spec)
    case = testing_varlen.PackedCase(mod, spec, [9, 0, 4], None, 1)
    names = testing.differentiable_inputs(spec)
    cu = case.cu_seqlens.as_subclass(_HostReadWatch)
    packed = {"cu_seqlens": cu, "max_seqlen": case.max_seqlen}
    attention = getattr(mod, f"{spec.family}_attention")

    def calls():
        leaves = {n: x.detach().clone().requires_grad_(n in names) for n, x in case.inputs.items()}
        attention(**leaves, **packed).square().sum().backward()
        if spec.family == "dsa":
            idx = {n: case.inputs[n] for n in ("q_idx", "k_idx", "w_idx")}
            mod.index_topk(**idx, **packed)
            return mod.distill_loss(case.inputs["q"], case.inputs["k"], **idx, **packed)
        return None

    monkeypatch.setattr(_HostReadWatch, "reads", [])
    calls()                                           # eager: check_varlen reads the values once
    assert any(name == "tolist" for name, _ in _HostReadWatch.reads), "the watch saw no host read"
    monkeypatch.setattr(_HostReadWatch, "reads", [])
    monkeypatch.setattr(runtime, "_no_host_reads", lambda: True)
    loss = calls()
    assert not _HostReadWatch.reads, "".join(f"\n{name}:\n{''.join(stack)}" for name, stack in _HostReadWatch.reads)
    assert loss is None or torch.isfinite(loss.as_subclass(torch.Tensor))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (CUDA-graph capture)")
@pytest.mark.parametrize("path", ["specs/nsa_small.yaml", "specs/dsa_small.yaml"])
def test_packed_training_call_in_a_cuda_graph(path):
    """A packed differentiable call, forward and backward, captured in one CUDA graph (PyTorch's whole-network
    capture: warm-up on a side stream, gradients allocated in the graph's pool) and replayed on new input values
    gives the eager call's output on those values bit for bit, and its gradients bit for bit where the backward is
    deterministic (dsa_small's dK/dV go by fp32 atomics, the scatter path: within rounding of the adds' order)."""
    spec = load_spec(path)
    mod = specgen.load(spec)
    attention = getattr(mod, f"{spec.family}_attention")
    names = testing.differentiable_inputs(spec)
    case = testing_varlen.PackedCase(mod, spec, [300, 0, 57, 1000], "cuda", None)
    packed = case.varlen()
    static = {n: x.detach().clone().requires_grad_(n in names) for n, x in case.inputs.items()}
    dout = torch.randn(case.total, spec.heads.q, spec.head_dim.v, device="cuda", dtype=mod.DTYPE)

    def step():
        out = attention(**static, **packed)
        out.backward(dout)
        return out

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(2):
            for x in static.values():
                x.grad = None
            step()
    torch.cuda.current_stream().wait_stream(side)
    for x in static.values():
        x.grad = None
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = step()
    atomics = testing.scatters(mod)
    for trial in range(2):
        fresh = testing_varlen.PackedCase(mod, spec, case.lengths, "cuda", case.seed + 1 + trial).inputs
        with torch.no_grad():
            for n, x in static.items():
                x.copy_(fresh[n])
        out.fill_(float("nan"))
        graph.replay()
        torch.cuda.synchronize()
        leaves = {n: x.detach().clone().requires_grad_(n in names) for n, x in fresh.items()}
        want = attention(**leaves, **packed)
        want.backward(dout)
        assert torch.equal(out, want), f"replay {trial}: the output differs from the eager call {case.where}"
        for n in names:
            got, exp = static[n].grad, leaves[n].grad
            if atomics and n in ("k", "v", "k_slc", "v_slc"):
                err = R.rel_err(got.double(), exp.double())
                assert err < 1e-3, f"replay {trial}: d{n} rel err {err:.2e} {case.where}"
            else:
                assert torch.equal(got, exp), f"replay {trial}: d{n} differs {case.where}"


# Native packed forward (docs/varlen.md, "Native forward"): no padded row is computed or stored.

def test_tile_table_and_offsets():
    """The device-built tables: (sequence, tile) per program with empty sequences skipped and programs past the
    batch marked -1; pooled-block and unit offsets per sequence; all sized from host ints only."""
    cu = torch.tensor([0, 9, 9, 10, 27], dtype=torch.int32)      # lengths 9, 0, 1, 17
    packed = runtime.check_varlen("f", cu, 17, 27, cu.device, 64, "s")
    lay = packed.layout()
    table, n = lay.token_tiles(4)
    assert n == 7 + 4                                            # cdiv(27, 4) + N bounds 3 + 0 + 1 + 5 tiles
    assert table.tolist() == [[0, 0], [0, 1], [0, 2], [2, 0], [3, 0], [3, 1], [3, 2], [3, 3], [3, 4]] + [[-1, 0]] * 2
    cu_blocks, cap = lay.pooled(8, 4)                            # NC = 1, 0, 0, 3 complete blocks of 8, stride 4
    assert cu_blocks.tolist() == [0, 1, 1, 1, 4] and cap == 27 // 4
    table, n = lay.block_tiles(8, 4, 2)
    assert table.tolist()[:3] == [[0, 0], [3, 0], [3, 1]] and all(r == [-1, 0] for r in table.tolist()[3:])
    cu_units, unit_seq, bound = lay.units(16)                    # 1, 0, 1, 2 units of 16 tokens
    assert cu_units.tolist() == [0, 1, 1, 2, 4] and bound == 27 // 16 + 4
    assert unit_seq.tolist()[:4] == [0, 2, 3, 3]
    assert packed.positions().tolist() == list(range(9)) + [0] + list(range(17))
    assert packed._row_ok is None                                # the [N, max_seqlen] map was never built


# One long sequence and short ones: empty, one token, shorter than every block (compression 8, selection 16), 13
# (a multiple of no block size). The long one (77, a multiple of no block size either) spans 5 selection blocks (top-4
# drops one), 3 query tiles of 32 rows (2 of 64 at GQA group 1) and both forward budgets' chunks below. The trailing
# empty sequences make the padded batch (16 x 77 rows) exceed the allocation bound at the cost of one early-exit
# program each: every program the interpreter runs on a real sequence costs the most (the block scorer's above all).
LONG_AND_SHORT = [77] + [2, 0, 5, 1, 13, 3, 0, 7] + [0] * 7     # 16 sequences, 108 tokens


# Each loop order of the selection and each GQA group size once (the kv-order and query-order kernels at groups 1
# and 2 are one code path apiece, the group a constexpr), and DSA token selection (the indexer, query order).
NATIVE = {
    "kv_order_gqa2": lambda: SMALL,
    "query_order_gqa1": lambda: small("gqa1_query", **{"heads.q": 2, "heads.kv": 2, "selection.loop_order": "query"}),
    "dsa_token": lambda: load_spec("specs/dsa_small.yaml"),
}


@pytest.mark.parametrize("variant", list(NATIVE))
def test_native_forward_never_pads(variant, monkeypatch):
    """One long sequence and 15 short ones (empty, shorter than every block, lengths that are multiples of no block
    size): the packed forward matches the per-sequence reference without ever building the padded batch, and no
    buffer it allocates is larger than a fixed multiple of `total` (the padded inputs would be 16 x 77 rows): at
    most 4 bytes per (token, query head, selected block (kv order) or branch, head dim), plus the indexer's fixed
    workspace. The checked call is the measured one (its fresh buffers poisoned by the watch)."""
    spec = NATIVE[variant]()
    mod = specgen.load(spec)

    def no_padding(*args, **kwargs):
        raise AssertionError("the native packed forward padded its inputs")

    monkeypatch.setattr(runtime.Packed, "pad", no_padding)
    # Small budgets: the block-outer selection goes by query chunks of 40 packed rows (cuts at rows 40, in the long
    # sequence, and 80, in the one of 5) and the indexer by chunks of 16 rows, which its score tile rounds up to one
    # tile-table entry of 64 (the long sequence in two launches); the indexer's fixed workspace (docs/semantics.md)
    # stays out of the bound below, which is about the per-token buffers.
    per_query = spec.heads.q * (spec.selection.top_k if spec.selection else 1) * (spec.head_dim.v * 2 + 4)
    monkeypatch.setattr(runtime.launches, "KV_PARTIAL_BYTES", 40 * per_query)
    monkeypatch.setattr(runtime.indexer, "INDEX_WORKSPACE_BYTES", 1 << 14)

    sel = spec.selection
    total, longest = sum(LONG_AND_SHORT), max(LONG_AND_SHORT)
    # Per token: the block-outer selection's partial outputs (one per selected block), else the branch outputs.
    kv_order = hasattr(mod, "_selection_kv_merge_kernel")
    assert kv_order == variant.startswith("kv_order")
    per_token = (spec.heads.q * (sel.top_k if kv_order else len(spec.branches)) * max(spec.head_dim.qk, spec.head_dim.v)
                 + (2 * spec.heads.kv * sel.top_k if sel else 0))
    workspace = 16 * spec.heads.kv * -(-longest // (sel.block if sel else 1)) + (1 << 12)
    bound = 4 * (total * per_token + workspace)
    padded_q = len(LONG_AND_SHORT) * longest * spec.heads.q * spec.head_dim.qk * mod.DTYPE.itemsize
    assert bound < padded_q, "the batch must make padding visible: the padded q alone would exceed the bound"
    watch = testing_varlen.AllocationWatch()
    testing_varlen.check_forward_varlen(mod, spec, LONG_AND_SHORT, around=lambda: watch)
    assert 0 < watch.largest[0] <= bound, f"largest buffer {watch.largest} exceeds {bound} bytes ({variant})"


def test_native_forward_takes_given_indices(monkeypatch):
    """`indices=` on a native packed call (checked per sequence, used as given): the forward's own selection given
    back reproduces its output bit for bit, also when the block-outer selection goes by query chunks that cut a
    sequence."""
    mod = specgen.load(SMALL)
    case = testing_varlen.PackedCase(mod, SMALL, LENGTHS, None, 7)
    out, idx = mod.nsa_forward(**case.inputs, return_indices=True, **case.varlen())
    again = mod.nsa_forward(**case.inputs, indices=idx, **case.varlen())
    assert torch.equal(out, again)
    monkeypatch.setattr(runtime.launches, "KV_PARTIAL_BYTES", 1)      # one packed row per query chunk
    chunked = mod.nsa_forward(**case.inputs, indices=idx, **case.varlen())
    assert torch.equal(out, chunked)
