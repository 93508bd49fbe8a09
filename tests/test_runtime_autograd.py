"""The host code generated modules delegate to (specgen/runtime/: descriptor, checks, varlen, inference, autograd,
layer), tested directly with plain torch: a fake descriptor whose `forward`/`backward` are torch ops stands in for
the generated launch sequences, so no kernel and no interpreter run here."""

import ast
import itertools
from pathlib import Path
from typing import NamedTuple, Optional

import pytest
import torch

import specgen
from specgen import runtime
from specgen.runtime import autograd, descriptor, inference, layer
from specgen.testing import test_device


@pytest.fixture(autouse=True)
def _on_the_test_device():
    """The fake launches are plain torch, but the runtime refuses CPU tensors where the kernels run on a GPU: every
    tensor these tests make lives on the test device (CUDA on a GPU machine, else the CPU)."""
    with torch.device(test_device()):
        yield

HQ, HKV, D, TOP_K = 2, 2, 4, 3
WHY = "the spec needs it"


class State(NamedTuple):
    out: torch.Tensor
    lse: torch.Tensor
    indices: Optional[torch.Tensor]
    branch_out: Optional[torch.Tensor]
    kc: Optional[torch.Tensor]
    vc: Optional[torch.Tensor]


def fake_forward(q, k, v, w_idx, indices=None, out=None, save_branch_outputs=False):
    """out = 2 q v + k (per token, no mixing across positions, so a packed batch equals its sequences run
    alone); lse = the token's position; indices = the position too (or the given ones)."""
    B, T = q.shape[0], q.shape[1]
    o = 2 * q * v + k + w_idx[..., :1, None]
    if out is not None:
        out.copy_(o)
        o = out
    pos = torch.arange(T, dtype=torch.float32).view(1, T, 1, 1)
    lse = pos.expand(B, T, HQ, 1).contiguous()
    if indices is None:
        indices = pos.to(torch.int32).expand(B, T, HKV, TOP_K).contiguous()
    return State(o, lse, indices, o.unsqueeze(0).clone() if save_branch_outputs else None, None, None)


def fake_backward(dout, q, k, v, lse, indices, branch_out, kc, vc):
    return 2 * dout * v, dout.clone(), 2 * dout * q


def make_desc(name="fake", records="none", **kw):
    args = (descriptor.Arg("q", ("B", "T", HQ, D)), descriptor.Arg("k", ("B", "T", HKV, D)),
            descriptor.Arg("v", ("B", "T", HKV, D)),
            descriptor.Arg("w_idx", ("B", "T", HKV), keyword=True, why=WHY))
    fields = dict(spec_name=name, spec_hash="0123456789abcdef", records_hash=records, family="nsa",
                  dtype=torch.float32, heads_q=HQ, heads_kv=HKV, dim_qk=D, dim_v=D, branches=("selection",),
                  max_seqlen=16, args=args, top_k=TOP_K, unit=1, forward=fake_forward, backward=fake_backward)
    fields.update(kw)
    return descriptor.Descriptor(**fields)


DESC = make_desc()
ATTN = autograd.Attention(DESC)


def inputs(B=2, T=5, seed=0, requires_grad=False):
    g = torch.Generator(test_device()).manual_seed(seed)
    x = tuple(torch.randn(B, T, h, D, generator=g) for h in (HQ, HKV, HKV))
    x += (torch.randn(B, T, HKV, generator=g),)
    return tuple(t.requires_grad_(requires_grad and i < 3) for i, t in enumerate(x))


def test_descriptor_derives_names_once():
    assert DESC.arg_names == ("q", "k", "v", "w_idx")
    assert DESC.diff_args == ("q", "k", "v") and DESC.index_args == ("w_idx",)
    assert DESC.diff_positions == (0, 1, 2)
    assert DESC.kv_inputs == (("k", D), ("v", D))
    assert (DESC.forward_name, DESC.attention_name) == ("nsa_forward", "nsa_attention")
    assert DESC.args[0].packed_shape == ("total", HQ, D) and DESC.args[0].per_token
    assert not descriptor.Arg("w", (2, 8, 4)).per_token


def test_custom_op_names_carry_spec_hash_and_tuning_record():
    # The runtime schema too: torch.compile's on-disk caches know an op by its name (docs/backward.md).
    assert ATTN.op_name == f"fake_0123456789abcdef_none_s{specgen.RUNTIME_SCHEMA}"
    schema = str(ATTN.fwd_op._opoverload._schema)
    assert schema.startswith(f"specgen::{ATTN.op_name}_fwd(Tensor q, Tensor k, Tensor v, Tensor w_idx, "
                             "Tensor? indices, bool save_branch_outputs, Tensor? cu_seqlens, SymInt max_seqlen, "
                             "Tensor? distill_p=None) -> "
                             "(Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)")
    bwd = str(ATTN.bwd_op._opoverload._schema)
    assert "(Tensor dout, Tensor q, Tensor k, Tensor v, Tensor lse, Tensor indices, Tensor branch_out" in bwd
    assert "SymInt max_seqlen, Tensor(a11!) distill_p) -> (" in bwd, bwd  # the one argument it writes
    # Another tuning record: other ops. The same spec and record again (a second module object): the same ops.
    other = autograd.Attention(make_desc(records="feedfacefeedface"))
    assert other.op_name != ATTN.op_name
    again = autograd.Attention(make_desc())
    assert again.fwd_op._qualified_op_name == f"specgen::{ATTN.op_name}_fwd"
    assert again.bwd_op._qualified_op_name == f"specgen::{ATTN.op_name}_bwd"


def test_forward_checks_and_runs_the_launches():
    q, k, v, w = inputs()
    out, lse, idx = inference.forward(DESC, (q, k, v, w), return_lse=True, return_indices=True)
    assert torch.equal(out, fake_forward(q, k, v, w).out) and lse.shape == (2, 5, HQ, 1) and idx.shape[-1] == TOP_K
    assert inference.forward(DESC, (q, k, v, w)).shape == out.shape      # out alone
    given = torch.zeros(2, 5, HKV, TOP_K, dtype=torch.int32)
    given[..., 1:] = -1
    assert torch.equal(inference.forward(DESC, (q, k, v, w), indices=given, return_indices=True)[1], given)


@pytest.mark.parametrize("call", ["forward", "attention"])
def test_errors_name_the_entry_point_and_the_argument(call):
    q, k, v, w = inputs()
    run = (lambda a, **kw: inference.forward(DESC, a, **kw)) if call == "forward" else \
        (lambda a, **kw: ATTN.attention(a, **kw))
    fn = f"nsa_{call}"
    with pytest.raises(runtime.ArgumentError, match=rf"^{fn}: argument `w_idx` is required: {WHY}"):
        run((q, k, v, None))
    with pytest.raises(runtime.ArgumentError, match=rf"^{fn}: argument `k` has T=4 \(dim 1\) but `q` has T=5"):
        run((q, k[:, :4], v, w))
    with pytest.raises(runtime.ArgumentError, match=rf"^{fn}: argument `q` has T=17"):
        run(tuple(torch.cat([x] * 4, 1)[:, :17] for x in (q, k, v, w)))
    with pytest.raises(runtime.ArgumentError, match=rf"^{fn}: argument `max_seqlen` is required"):
        run(tuple(x[0] for x in (q, k, v, w)), cu_seqlens=torch.tensor([0, 5], dtype=torch.int32))
    no_sel = make_desc(name="fake_nosel", top_k=0)
    with pytest.raises(runtime.ArgumentError, match=r"has no selection branch, so it takes no `indices`"):
        (inference.forward(no_sel, (q, k, v, w), indices=torch.zeros(1)) if call == "forward"
         else autograd.Attention(no_sel).attention((q, k, v, w), indices=torch.zeros(1)))


@pytest.mark.parametrize("call", ["forward", "attention"])
def test_packed_call_equals_each_sequence_alone(call):
    """The varlen wrapper: a packed batch [total, ...] runs padded to [N, max_seqlen] and comes back packed;
    positions restart at each sequence (the fake's lse and indices are positions)."""
    lengths = [3, 0, 5, 1]
    cu = torch.tensor([0] + list(itertools.accumulate(lengths)), dtype=torch.int32)
    q, k, v, w = (x[0] for x in inputs(B=1, T=sum(lengths)))
    run = (lambda a, **kw: inference.forward(DESC, a, **kw)) if call == "forward" else \
        (lambda a, **kw: ATTN.attention(a, **kw))
    out, lse, idx = run((q, k, v, w), cu_seqlens=cu, max_seqlen=max(lengths), return_lse=True,
                        return_indices=True)
    assert out.shape == (sum(lengths), HQ, D)
    for i, n in enumerate(lengths):
        if n == 0:
            continue
        s = slice(int(cu[i]), int(cu[i + 1]))
        ref = run(tuple(x[s].unsqueeze(0) for x in (q, k, v, w)), return_lse=True, return_indices=True)
        for got, want in zip((out, lse, idx), ref):
            assert torch.equal(got[s], want[0])
    if call == "forward":  # into a preallocated out
        buf = torch.empty_like(out)
        assert run((q, k, v, w), cu_seqlens=cu, max_seqlen=5, out=buf) is buf and torch.equal(buf, out)
    # Given indices are checked against each sequence and padded with -1.
    given = torch.zeros(sum(lengths), HKV, TOP_K, dtype=torch.int32)
    given[..., 1:] = -1
    got = run((q, k, v, w), cu_seqlens=cu, max_seqlen=5, indices=given, return_indices=True)[1]
    assert torch.equal(got, given)
    bad = given.clone()
    bad[8, 0, 0] = 1  # token 8 is sequence 3, of one token: key 1 is past its end
    with pytest.raises(runtime.ArgumentError, match="indices"):
        run((q, k, v, w), cu_seqlens=cu, max_seqlen=5, indices=bad)


def test_attention_eager_and_custom_op_paths_give_the_same_gradients():
    def grads(fn):
        x = inputs(requires_grad=True)
        out = fn(x)
        (out * torch.arange(out.numel()).view(out.shape)).sum().backward()
        return [out.detach()] + [t.grad for t in x[:3]]

    eager = grads(lambda x: ATTN.attention(x))
    op = grads(lambda x: ATTN.fwd_op(*x, None, True, None, 0)[0])
    function = grads(lambda x: _Function.apply(*x, None)[0])
    q, k, v, w = (t.detach() for t in inputs())
    dout = torch.arange(q.numel(), dtype=torch.float32).view(q.shape)
    expected = [fake_forward(q, k, v, w).out, *fake_backward(dout, q, k, v, None, None, None, None, None)]
    for got in (eager, op, function):
        for a, b in zip(got, expected):
            assert torch.equal(a, b)


class _Function(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, w_idx, indices):
        return ATTN.function_forward(ctx, (q, k, v, w_idx), indices)

    @staticmethod
    def backward(ctx, d_out, d_lse, d_idx):
        return ATTN.function_backward(ctx, d_out)


def test_one_ungated_branch_saves_out_as_its_branch_output():
    """docs/backward.md "Memory": the custom op hands back no branch outputs (they would alias `out`), and each
    path's backward (eager, custom op, classic Function) reads the forward's `out` in their place."""
    seen = []

    def backward(dout, q, k, v, lse, indices, branch_out, kc, vc):
        seen.append(branch_out.detach().clone())
        return fake_backward(dout, q, k, v, lse, indices, branch_out, kc, vc)

    attn = autograd.Attention(make_desc(name="fake_saves_out", backward=backward))
    x = inputs(requires_grad=True)
    assert attn.fwd_impl(*x, None, True, None, 0)[3].numel() == 0
    assert attn.fwd_fake(*x, None, True, None, 0)[3].numel() == 0
    function = type("F", (torch.autograd.Function,), {
        "forward": staticmethod(lambda ctx, *a: attn.function_forward(ctx, a[:4], a[4])),
        "backward": staticmethod(lambda ctx, d_out, *_: attn.function_backward(ctx, d_out))})
    want = fake_forward(*(t.detach() for t in x)).out
    for run in (lambda: attn.attention(x), lambda: attn.fwd_op(*x, None, True, None, 0)[0],
                lambda: function.apply(*x, None)[0]):
        run().sum().backward()
        assert torch.equal(seen.pop(), want)


def test_no_grad_forward_keeps_no_branch_outputs():
    x = inputs()
    out, lse, idx, branch_out, kc, vc = ATTN.fwd_impl(*x, None, False, None, 0)
    assert branch_out.numel() == 0 and kc.numel() == 0 and vc.numel() == 0
    out, *_ = ATTN.fwd_op(*(t.clone().requires_grad_(i == 0) for i, t in enumerate(x)), None, False, None, 0)
    with pytest.raises(RuntimeError, match="fake: backward through a forward that kept no branch outputs; call "
                                           "nsa_attention"):
        out.sum().backward()
    with torch.no_grad():
        assert not ATTN.attention(inputs(requires_grad=True)).requires_grad


def test_fake_implementations_match_the_real_shapes():
    x = inputs()
    real = ATTN.fwd_impl(*x, None, True, None, 0)
    fake = ATTN.fwd_fake(*x, None, True, None, 0)
    assert [tuple(t.shape) for t in real[:4]] == [tuple(t.shape) for t in fake[:4]]
    assert [t.dtype for t in real] == [t.dtype for t in fake]
    saved = (x[0], x[1], x[2], real[1], real[2], real[3], real[4], real[5], None, 0)
    assert [t.shape for t in ATTN.bwd_fake(real[0], *saved)] == [t.shape for t in x[:3]]


def test_autocast_casts_floating_inputs_to_the_spec_dtype():
    desc = make_desc(name="fake_fp16", dtype=torch.bfloat16)
    attn = autograd.Attention(desc)
    x = inputs()
    with torch.autocast(torch.device(test_device()).type, dtype=torch.bfloat16):
        out = attn.attention(x)
    assert out.dtype == torch.bfloat16
    with pytest.raises(runtime.ArgumentError, match="must be torch.bfloat16"):
        attn.attention(x)


LAYER_DESC = make_desc(name="fake_layer", indexer_heads=1, indexer_dim=4)


class _Layer(layer.AttentionLayer):
    _desc = LAYER_DESC
    _attention = autograd.Attention(LAYER_DESC)


def test_layer_projections_and_packed_call():
    torch.manual_seed(0)
    lay = _Layer(8)
    assert [n for n, _ in lay.named_parameters()] == [
        "q_proj.weight", "kv_proj.weight", "o_proj.weight", "idx_q_proj.weight", "idx_k_proj.weight",
        "idx_w_proj.weight"]
    assert lay.kv_proj.out_features == 2 * HKV * D and lay.idx_w_proj.out_features == HKV
    hidden = torch.randn(2, 5, 8, requires_grad=True)
    with pytest.raises(runtime.ArgumentError, match=r"^_Layer.forward: argument `hidden` must be \[B, T"):
        lay(hidden[0])
    out = lay(hidden)
    assert out.shape == hidden.shape
    out.sum().backward()
    assert lay.q_proj.weight.grad is not None and lay.idx_w_proj.weight.grad is None  # indexer: no gradient
    packed = lay(hidden.flatten(0, 1), cu_seqlens=torch.tensor([0, 5, 10], dtype=torch.int32), max_seqlen=5)
    assert torch.allclose(packed, out.flatten(0, 1), atol=1e-6)


def test_rope_rotates_pairs_and_restarts_with_positions():
    x = torch.randn(1, 6, 2, 8)
    assert torch.allclose(layer.rope(x, 10000.0)[:, 0], x[:, 0])             # position 0: identity
    assert torch.allclose(layer.rope(x, 10000.0).norm(dim=-1), x.norm(dim=-1), atol=1e-5)
    pos = torch.tensor([0, 1, 2, 0, 1, 2])
    y = layer.rope(x, 10000.0, pos)
    assert torch.allclose(y[:, 3:], layer.rope(x[:, 3:], 10000.0), atol=1e-6)


def test_runtime_imports_nothing_of_the_generator():
    """specgen.runtime is what generated modules import: torch, triton, the stdlib and itself only (the package
    `specgen` itself for its constants; tests/test_architecture.py checks the whole import graph)."""
    folder = Path(runtime.__file__).parent

    def allowed(module: str) -> bool:
        return module == "specgen" or module == "specgen.runtime" or module.startswith("specgen.runtime.")

    for path in folder.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                assert node.level == 1 or not (node.module or "").startswith("specgen") or allowed(node.module), \
                    (path.name, node.module)
                assert node.level != 2, (path.name, node.module)
            elif isinstance(node, ast.Import):
                assert all(allowed(a.name) for a in node.names if a.name.startswith("specgen")), path.name


@pytest.mark.parametrize("unit,tile", [(4, 4), (4, 16), (1, 8)])
def test_selection_inverse_index_lists_each_tiles_queries(unit, tile):
    """The selection dK/dV's block -> queries CSR, against a direct listing."""
    from specgen.runtime import backward

    B, T, G, k = 2, 19, 2, 3
    n_units = -(-T // unit)
    g = torch.Generator(test_device()).manual_seed(1)
    indices = torch.full((B, T, G, k), -1, dtype=torch.int32)
    for b, t, h in itertools.product(range(B), range(T), range(G)):
        n = int(torch.randint(0, k + 1, (1,), generator=g))
        indices[b, t, h, :n] = torch.randperm(n_units, generator=g)[:n].sort().values.to(torch.int32)
    upt = tile // unit
    offsets, qpos, bits = backward.selection_inverse_index(indices, T, tile, unit=unit, heads_kv=G,
                                                           units_per_tile=upt)
    n_tiles = -(-T // tile)
    for b, h, j in itertools.product(range(B), range(G), range(n_tiles)):
        seg = (b * G + h) * n_tiles + j
        want = {}
        for t in range(T):
            for u in indices[b, t, h].tolist():
                if u >= 0 and u * unit // tile == j:
                    want[t] = want.get(t, 0) | 1 << (u * unit % tile // unit)
        got = slice(int(offsets[seg]), int(offsets[seg + 1]))
        assert qpos[got].tolist() == sorted(want)
        if upt > 1:
            assert bits[got].tolist() == [want[t] for t in sorted(want)]


# Ops that torch.use_deterministic_algorithms(True) swaps, on CUDA, for another algorithm or an error (torch's
# docstring of use_deterministic_algorithms): scatter with a tensor source goes through the sort-based index_put_,
# whose kernel walks each index's duplicates serially (docs/backward.md, "Determinism").
_MODE_DEPENDENT_OPS = {"scatter", "scatter_add", "scatter_reduce", "index_put", "index_put_impl", "index_add",
                       "index_copy", "index_reduce", "put", "bincount", "histc", "median"}


class _OpNames(torch.utils._python_dispatch.TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.seen = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        name = func.overloadpacket.__name__.strip("_")
        if name == "cumsum" and out.is_floating_point():
            name = "cumsum (floating)"
        self.seen.append(name)
        return out


@pytest.mark.parametrize("unit,tile", [(1, 8), (4, 16), (4, 4)])
def test_inverse_indices_use_no_op_that_deterministic_mode_swaps(unit, tile):
    """The selection's and the distillation's inverse indices (the kernels deterministic mode runs) are built from
    sorts, running sums of integers, searches and gathers alone, so they cost the same with
    torch.use_deterministic_algorithms(True) as without it (a scatter there took seconds at V3.2's 16k)."""
    from specgen.runtime import backward, distill

    B, T, G, k = 2, 23, 2, 4
    g = torch.Generator(test_device()).manual_seed(3)
    n_units = -(-T // unit)
    indices = torch.randint(-1, n_units, (B, T, G, k), generator=g, dtype=torch.int32)
    indices = runtime.canonical_indices(indices)
    with _OpNames() as ops:
        backward.selection_inverse_index(indices, T, tile, unit=unit, heads_kv=G, units_per_tile=tile // unit)
        distill.inverse_index(indices, G)
    assert "sort" in ops.seen and "searchsorted" in ops.seen  # the recorder saw the build
    bad = sorted(set(ops.seen) & (_MODE_DEPENDENT_OPS | {"cumsum (floating)"}))
    assert not bad, f"the inverse index uses {bad}, which deterministic mode replaces on CUDA"


def test_distill_inverse_index_lists_every_valid_pair():
    from specgen.runtime import distill

    B, T, G, k = 2, 7, 2, 3
    g = torch.Generator(test_device()).manual_seed(2)
    indices = torch.randint(-1, T, (B, T, G, k), generator=g, dtype=torch.int32)
    ptr, pos = distill.inverse_index(indices, G)
    for b, h, s in itertools.product(range(B), range(G), range(T)):
        key = (b * G + h) * T + s
        got = pos[int(ptr[key]):int(ptr[key + 1])].tolist()
        want = [((b * T + t) * G + h) * k + j for t in range(T) for j in range(k)
                if indices[b, t, h, j] == s and s <= t]
        assert got == want


def test_distill_loss_checks_stage_and_runs_a_packed_batch_natively():
    """The distillation loss's host code with a fake custom op: the stage rules, and a packed call handed over
    as a batch of one [1, total, ...] with cu_seqlens and max_seqlen (native: nothing padded), the sparse stage's
    own selection from the packed index_topk."""
    from specgen.runtime import distill

    desc = make_desc(name="fake_distill", args=(
        descriptor.Arg("q", ("B", "T", HQ, D)), descriptor.Arg("k", ("B", "T", HKV, D)),
        descriptor.Arg("q_idx", ("B", "T", HKV, D), keyword=True, why=WHY),
        descriptor.Arg("k_idx", ("B", "T", HKV, D), keyword=True, why=WHY),
        descriptor.Arg("w_idx", ("B", "T", HKV), keyword=True, why=WHY)))
    seen = {}

    def fwd(q, k, q_idx, k_idx, w_idx, indices, lse_main, cu_seqlens, max_seqlen):
        seen.update(shape=tuple(q.shape), indices=indices, varlen=(cu_seqlens, max_seqlen), grad=q.requires_grad)
        return q_idx.sum(), None, None

    def topk(q_idx, k_idx, w_idx, cu_seqlens=None, max_seqlen=None):
        seen.update(topk_varlen=(cu_seqlens, max_seqlen))
        return torch.zeros(q_idx.shape[:-2] + (HKV, TOP_K), dtype=torch.int32)

    loss = distill.Distill(desc, fwd, None, topk, "dense").loss
    q, k, _, _ = inputs(B=1, T=5)
    q.requires_grad_(True)
    x = (q, k, k.clone(), k.clone(), k[..., 0].clone())
    loss(*x)
    assert seen["indices"] is None and seen["varlen"] == (None, 0) and not seen["grad"]   # dense: no selection
    loss(*x, stage="sparse")
    assert seen["indices"].shape == (1, 5, HKV, TOP_K)                               # the indexer's own top-k
    with pytest.raises(runtime.ArgumentError, match=r"^distill_loss: argument `stage` must be 'dense' or 'sparse' "
                                                    r"\(or None: the spec's 'dense'\), got 'x'"):
        loss(*x, stage="x")
    with pytest.raises(runtime.ArgumentError, match="dense warm-up stage"):
        loss(*x, stage="dense", indices=torch.zeros(1, 5, HKV, TOP_K, dtype=torch.int32))
    with pytest.raises(runtime.ArgumentError, match=r"^distill_loss: argument `w_idx` must have 3 dims"):
        loss(*x[:4], x[3])
    cu = torch.tensor([0, 2, 5], dtype=torch.int32)
    loss(*(t[0] for t in x), cu_seqlens=cu, max_seqlen=3)
    assert seen["shape"] == (1, 5, HQ, D) and seen["varlen"][0] is cu and seen["varlen"][1] == 3
    loss(*(t[0] for t in x), cu_seqlens=cu, max_seqlen=3, stage="sparse")
    assert seen["indices"].shape == (1, 5, HKV, TOP_K) and seen["topk_varlen"][0] is cu


def test_index_topk_checks_and_packs():
    """`index_topk`'s host code with a fake scorer that writes each query's position: a packed call restarts
    positions at each sequence and comes back packed."""
    from specgen.runtime import indexer

    desc = make_desc(name="fake_index", args=(
        descriptor.Arg("q", ("B", "T", HQ, D)),
        descriptor.Arg("q_idx", ("B", "T", HKV, D), keyword=True, why=WHY),
        descriptor.Arg("k_idx", ("B", "T", HKV, D), keyword=True, why=WHY),
        descriptor.Arg("w_idx", ("B", "T", HKV), keyword=True, why=WHY)))

    def select(q_idx, k_idx, w_idx, indices, scores):
        assert not torch.is_grad_enabled()
        pos = torch.arange(q_idx.shape[1], dtype=torch.int32).view(1, -1, 1, 1)
        indices.copy_(pos.expand_as(indices))
        if scores is not None:
            scores.copy_(indices)

    x = (torch.randn(1, 6, HKV, D), torch.randn(1, 6, HKV, D), torch.randn(1, 6, HKV))
    idx, sc = indexer.index_topk(desc, select, *x, return_scores=True)
    assert idx.shape == (1, 6, HKV, TOP_K) and torch.equal(sc, idx.float())
    with pytest.raises(runtime.ArgumentError, match=r"^index_topk: argument `q_idx` has T=17 \(dim 1\), which "
                                                    r"exceeds the spec's max_seqlen=16"):
        indexer.index_topk(desc, select, torch.randn(1, 17, HKV, D), *x[1:])
    cu = torch.tensor([0, 2, 6], dtype=torch.int32)
    packed = indexer.index_topk(desc, select, *(t[0] for t in x), cu_seqlens=cu, max_seqlen=4)
    assert packed[:, 0, 0].tolist() == [0, 1, 0, 1, 2, 3]


def test_given_indices_are_copied_only_by_the_custom_op():
    """Eager calls hand given indices back as given (no T x k copy: 0.5 GiB for V3.2 at 64k); the custom op's body
    copies them (its outputs may not alias its inputs). Changing them in place between the forward and the
    backward is caught by autograd's version check, not read silently."""
    x = inputs(requires_grad=True)
    given = torch.arange(TOP_K, dtype=torch.int32).expand(2, 5, HKV, TOP_K).contiguous()
    eager = ATTN.fwd_impl(*x, given, True, None, 0)[2]
    assert eager.data_ptr() == given.data_ptr()
    op = ATTN.fwd_op(*(t.detach() for t in x), given, False, None, 0)[2]
    assert op.data_ptr() != given.data_ptr() and torch.equal(op, given)
    out, _, idx = ATTN.attention(x, indices=given, return_lse=True, return_indices=True)
    assert torch.equal(idx, given)
    given.add_(1)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        out.sum().backward()


def test_the_eager_backward_gets_no_zeros_for_the_outputs_nobody_differentiates(monkeypatch):
    """The forward's other outputs (lse, branch_out, kc, vc) reach the eager backward as None: autograd fills no
    zero tensors for them (a fill of branch_out's size per backward on the GPU), and the gradients are unchanged."""
    seen = []
    original = ATTN.eager.backward

    def spy(ctx, d_out, *unused):
        seen.append(unused)
        return original(ctx, d_out, *unused)

    monkeypatch.setattr(ATTN.eager, "backward", staticmethod(spy))
    x = inputs(requires_grad=True)
    out = ATTN.attention(x)
    (out * torch.arange(out.numel()).view(out.shape)).sum().backward()
    assert len(seen) == 1 and len(seen[0]) == 5 and all(g is None for g in seen[0]), seen
    q, k, v, w = (t.detach() for t in inputs())
    dout = torch.arange(q.numel(), dtype=torch.float32).view(q.shape)
    for t, want in zip(x[:3], fake_backward(dout, q, k, v, None, None, None, None, None)):
        assert torch.equal(t.grad, want)
