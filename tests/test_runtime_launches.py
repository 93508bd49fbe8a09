"""The host side of the generated launch sequences (specgen/runtime/launches.py), tested directly with plain torch:
fake kernels record what each launch would receive, so no kernel and no interpreter run here. Also the compact
launch-config tables a module prints (specgen.compile.render.candidate_table) and their expansion at import."""

import ast

import pytest
import torch

from specgen import runtime
from specgen.compile.render import candidate_table
from specgen.compile.templating import pyliteral
from specgen.runtime import descriptor, launches
from specgen.testing import test_device


@pytest.fixture(autouse=True)
def _on_the_test_device():
    with torch.device(test_device()):
        yield


class FakeKernel:
    """`kernel[grid](*args, **meta)` records (grid, args, meta) instead of running."""

    def __init__(self, name="k"):
        self.name, self.calls = name, []

    def __getitem__(self, grid):
        def run(*args, **meta):
            self.calls.append((grid, args, meta))
        return run


def make_desc(branches=("compression", "selection", "window"), gated=True, mla=False, **kw):
    names = ("q", "k", "gates") if gated else ("q", "k")
    args = tuple(descriptor.Arg(n, ("B", "T", 4, 8)) for n in names)
    return descriptor.Descriptor(spec_name="fake", spec_hash="0" * 16, records_hash="none", family="nsa",
                                 dtype=torch.float32, heads_q=4, heads_kv=2, dim_qk=8, dim_v=6, branches=branches,
                                 max_seqlen=64, args=args, top_k=3, gated=gated, mla=mla, softmax_scale=0.5, **kw)


CONFIGS = {"default": {k: {"bt": 4, "block_n": 16, "bq": 2, "num_warps": 4, "num_stages": 2, "split": 8,
                           "max_splits": 4, "rows": 16, "tokens": 8, "chunks": 4, "blocks": 4}
                       for k in ("compression", "selection", "window", "compression_dq", "compression_dkdv",
                                 "selection_dq", "selection_dkdv", "window_dq", "window_dkdv", "preprocess", "pool")}}


def test_config_table_expands_rows_and_references():
    candidates = {"compression": [{"block_n": 64, "bt": 4, "num_warps": 4}, {"block_n": 32, "bt": 4, "num_warps": 8}],
                  "selection": [{"block_n": 16, "bt": 1, "num_warps": 4}],
                  "window": [{"block_n": 64, "bt": 4, "num_warps": 4}, {"block_n": 32, "bt": 4, "num_warps": 8}]}
    table = candidate_table(candidates)
    # bt is the same in every compression candidate: it prints once, beside the header.
    assert table["window"] == "compression" and table["compression"][:2] == (("block_n", "num_warps"), {"bt": 4})
    assert table["selection"][0] == ("block_n", "bt", "num_warps")  # one candidate: nothing to hoist
    # What the module prints is a literal; what it reads back is the candidates, each list its own objects.
    back = launches.config_table(ast.literal_eval(pyliteral(table)))
    assert back == candidates and back["window"] is not back["compression"]
    assert back["window"][0] is not back["compression"][0]


def test_pyliteral_round_trips_and_stays_within_its_width():
    value = {"name": "x\"y", "n": None, "rows": [(1, 2), (3,)], "nested": {"a": [1.5, True, {}], "b": ()},
             "long": list(range(60))}
    text = pyliteral(value, start=7)
    assert ast.literal_eval(text) == value
    assert all(len(line) <= 110 for line in text.splitlines()[1:]) and len(text.splitlines()[0]) <= 103


def test_strides_are_batch_token_head_of_each():
    a, b = torch.empty(2, 3, 4, 5), torch.empty(2, 3, 4, 5)[:, :, ::2]
    assert launches.strides(a, b) == (60, 20, 5, 60, 20, 10)


def test_forward_chains_the_branches_and_allocates_once():
    desc = make_desc()
    q, gates = torch.randn(2, 5, 4, 8), torch.randn(2, 5, 4, 3)
    f = launches.Forward(desc, CONFIGS, {}, q, gates, None, True, False)
    kernels = [FakeKernel(n) for n in desc.branches]
    kc = torch.randn(2, 1, 2, 8)
    f.attention(kernels[0], "compression", kc, kc, 1)
    idx = f.new_indices()
    f.attention(kernels[1], "selection", q, q, 5, idx, head_chunks=2)
    f.attention(kernels[2], "window", q, q, 5)
    flags = [k.calls[0][2] for k in kernels]
    assert [(m["HAS_PREV"], m["LAST"]) for m in flags] == [(False, False), (True, False), (True, True)]
    assert all(m["SAVE_BRANCH"] and m["BT"] == 4 for m in flags)
    (grid, args, _), = kernels[1].calls
    assert grid == (2, 2 * 2 * 2)  # cdiv(T, bt), B x kv heads x head chunks
    # After the indices: the packed launches' three pointers (unused placeholders here), then the strides.
    assert args[8] is idx and args[12:15] == launches.strides(q) and args[-2:] == (0.5, 2 * 5 * 4 * 6)
    assert all(m["VARLEN"] is False for m in flags)
    assert f.acc.dtype == torch.float32 and f.acc is not f.out and f.branch_out.shape == (3, 2, 5, 4, 6)
    state = f.state(idx, kc, None)
    assert state.out is f.out and state.branch_out is f.branch_out and state.indices is idx


def test_packed_forward_launches_over_the_tile_table():
    """A native packed call (docs/varlen.md): a batch of one [1, total, ...], each attention launch over the tile
    table of its config's query tile (cdiv(total, bt) + N programs) with VARLEN; the compression branch gets the
    pooled-block offsets, the others cu_seqlens; the scorer launches over its own tile."""
    desc = make_desc(cmp_block=4, cmp_stride=2)
    cu = torch.tensor([0, 7, 7, 10], dtype=torch.int32)             # lengths 7, 0, 3
    lay = runtime.check_varlen("f", cu, 7, 10, cu.device, 64, "fake").layout()
    q, gates = torch.randn(1, 10, 4, 8), torch.randn(1, 10, 4, 3)
    f = launches.Forward(desc, CONFIGS, {}, q, gates, None, False, False, lay)
    assert (f.B, f.T) == (1, 10) and f.out.shape == (1, 10, 4, 6) and f.compressed_blocks() == 10 // 2
    kernels = [FakeKernel(n) for n in desc.branches]
    kc = torch.randn(1, 5, 2, 8)
    f.attention(kernels[0], "compression", kc, kc, 5)
    idx = f.new_indices()
    assert idx.shape == (1, 10, 2, 3)
    f.attention(kernels[1], "selection", q, q, 10, idx, head_chunks=2)
    (grid, args, meta), = kernels[0].calls
    table, n = lay.token_tiles(4)
    assert grid == (n, 2) and n == 3 + 3 and meta["VARLEN"] is True and meta["BT"] == 4
    assert torch.equal(args[8], cu)
    assert torch.equal(args[9], lay.pooled(4, 2)[0]) and args[10] is table
    assert torch.equal(args[9], torch.tensor([0, 2, 2, 2], dtype=torch.int32))   # NC = 2, 0, 0
    (grid, args, meta), = kernels[1].calls
    assert grid == (n, 2 * 2) and args[8] is idx and torch.equal(args[10], cu) and meta["VARLEN"] is True
    scorer = FakeKernel()
    f.select_blocks(scorer, kc, idx, 5, bt=2, num_warps=4)
    f.select_blocks(scorer, kc, idx, 5, bt=2, **{"num_warps": 8, "num_stages": 2})   # the `select` launch config
    (grid, args, meta), (_, _, meta2) = scorer.calls
    assert grid == (lay.token_tiles(2)[1], 2) and meta["VARLEN"] is True
    assert (meta["num_warps"], meta["num_stages"], meta2["num_warps"], meta2["num_stages"]) == (4, 3, 8, 2)


def test_forward_of_one_ungated_branch_writes_out_directly():
    desc = make_desc(branches=("selection",), gated=False)
    q, out = torch.randn(1, 3, 4, 8), torch.empty(1, 3, 4, 6)
    f = launches.Forward(desc, CONFIGS, {}, q, None, out, False, False)
    k = FakeKernel()
    f.attention(k, "selection", q, q, 3, f.new_indices())
    (_, args, meta), = k.calls
    assert f.acc is out and f.branch_out is out and args[3] is q and (meta["HAS_PREV"], meta["LAST"]) == (False, True)
    assert args[-7:-4] == (0, 0, 0)  # no gates: zero strides
    assert f.state(None, None, None).branch_out is None


def test_backward_accumulates_targets_and_returns_gradients_in_order():
    desc = make_desc(branches=("selection", "window"), gated=False, mla=True)
    q = torch.randn(1, 4, 4, 8)
    pre = FakeKernel()
    b = launches.Backward(desc, CONFIGS, {}, pre, torch.randn(1, 4, 4, 6), q, None, torch.zeros(1, 4, 4, 2), q,
                          False)
    assert len(pre.calls) == 1 and b.dq_acc.shape == (1, 4, 4, 8)
    k = torch.randn(1, 4, 2, 8)
    dq = FakeKernel()
    b.dq(dq, "selection", k, k[..., :6], 4, torch.zeros(1, 4, 2, 3, dtype=torch.int32), head_chunks=3)
    b.dq(dq, "window", k, k[..., :6], 4)
    assert [c[0] for c in dq.calls] == [(4, 2 * 3), (1, 2)]
    assert [c[2]["HAS_PREV"] for c in dq.calls] == [False, True]
    win = FakeKernel()
    b.window_dkdv(win, "k", "v", k, k[..., :6])
    b.window_dkdv(win, "k", "v", k, k[..., :6])
    assert [c[2]["ACCUMULATE"] for c in win.calls] == [False, True]
    b.grads["k"].fill_(1.0)
    b.grads["v"].fill_(2.0)
    dq_out, dk = b.gradients(("q", "k"))
    assert dq_out.dtype == desc.dtype and torch.equal(dk[..., :6], torch.full((1, 4, 2, 6), 3.0))
    assert torch.equal(dk[..., 6:], torch.ones(1, 4, 2, 2))


@pytest.mark.parametrize("branches,gated", [(("selection",), False), (("selection",), True),
                                             (("selection", "window"), False)])
def test_training_buffers_of_one_branch(branches, gated, monkeypatch):
    """docs/backward.md "Memory": one branch writes dQ once, in the spec's dtype (several sum in fp32); one ungated
    branch keeps `out` itself as its branch output (no copy, SAVE_BRANCH off); DQ_IN_DTYPE / OUT_IS_BRANCH_OUTPUT
    off restore the former buffers."""
    import dataclasses
    desc = dataclasses.replace(make_desc(branches=branches, gated=gated), dtype=torch.float16)
    one, shared = len(branches) == 1, len(branches) == 1 and not gated
    q = torch.randn(1, 3, 4, 8, dtype=torch.float16)
    gates = torch.randn(1, 3, 4, len(branches), dtype=torch.float16) if gated else None
    for former in (False, True):
        monkeypatch.setattr(launches, "DQ_IN_DTYPE", not former)
        monkeypatch.setattr(launches, "OUT_IS_BRANCH_OUTPUT", not former)
        f = launches.Forward(desc, CONFIGS, {}, q, gates, None, True, False)
        k = FakeKernel()
        f.attention(k, branches[0], q, q, 3, f.new_indices())
        state = f.state(None, None, None)
        assert (state.branch_out is state.out) == (shared and not former)
        assert k.calls[0][2]["SAVE_BRANCH"] == (not shared or former)
        assert launches.out_is_branch_output(desc) == (shared and not former)
        b = launches.Backward(desc, CONFIGS, {}, FakeKernel(), torch.randn(1, 3, 4, 6, dtype=torch.float16), q, gates,
                              torch.zeros(1, 3, 4, len(branches)), state.branch_out, False)
        assert b.dq_acc.dtype == (torch.float16 if one and not former else torch.float32)
        b.dq(FakeKernel(), branches[0], q, q, 3)
        b.dq_acc.fill_(1.5)
        (dq,) = b.gradients(("q",))
        assert dq.dtype == torch.float16 and (dq is b.dq_acc) == (one and not former)


def test_selection_dkdv_builds_the_inverse_index_by_batch_groups():
    desc = make_desc(branches=("selection",), gated=False)
    B, T = 5, 4
    q = torch.randn(B, T, 4, 8)
    b = launches.Backward(desc, CONFIGS, {}, FakeKernel(), torch.randn(B, T, 4, 6), q, None,
                          torch.zeros(B, T, 4, 1), q, False)
    seen = []

    def inverse_index(indices, T_, tile):
        seen.append((indices.shape[0], T_, tile))
        return torch.zeros(1), torch.zeros(1), torch.zeros(1)

    k = FakeKernel()
    kv = torch.randn(B, T, 2, 8)
    # 2 x T x HKV x top_k entries per group: groups of two batch elements.
    b.selection_dkdv(k, "k", "v", kv, kv[..., :6], torch.zeros(B, T, 2, 3, dtype=torch.int32), inverse_index,
                     2 * T * 2 * 3)
    assert seen == [(2, T, 16), (2, T, 16), (1, T, 16)]
    assert [c[0] for c in k.calls] == [(1, 4), (1, 4), (1, 2)] and k.calls[0][1][0].shape[0] == 2


def test_compression_dkdv_splits_the_queries_and_sums_in_order():
    desc = make_desc()
    B, T, NC = 1, 20, 3
    q = torch.randn(B, T, 4, 8)
    b = launches.Backward(desc, CONFIGS, {}, FakeKernel(), torch.randn(B, T, 4, 6), q, torch.randn(B, T, 4, 3),
                          torch.zeros(B, T, 4, 3), q, False)

    class Writes(FakeKernel):
        def __getitem__(self, grid):
            def run(*args, **meta):
                self.calls.append((grid, args, meta))
                args[7].copy_(torch.arange(grid[2], dtype=torch.float32).view(-1, 1, 1, 1, 1).expand_as(args[7]))
                args[8].fill_(1.0)
            return run

    k = Writes()
    kc = torch.randn(B, NC, 2, 8)
    dkc, dvc = b.compression_dkdv(k, kc, kc[..., :6], NC)
    (grid, args, _), = k.calls
    assert grid == (1, 2, 3)  # cdiv(NC, block_n), B x kv heads, cdiv(T, split) splits (at most max_splits)
    assert args[-3] == 8  # queries per split: cdiv(cdiv(T, n_split), bt) x bt
    assert torch.equal(dkc, torch.full((B, NC, 2, 8), 0.0 + 1 + 2)) and torch.equal(dvc, torch.full((B, NC, 2, 6), 3.0))


def test_pool_launches_and_skips_an_empty_pool():
    k = FakeKernel()
    x = torch.randn(2, 9, 2, 8)
    out = launches.pool(k, x, 8, 0, heads_kv=2, bi=16, linear=False, has_pe=False, widen=False)
    assert out.shape == (2, 0, 2, 8) and not k.calls
    launches.pool(k, x, 8, 2, heads_kv=2, bi=16, linear=False, has_pe=False, widen=False)
    (grid, args, meta), = k.calls
    assert grid == (1, 4, 1) and meta["LINEAR"] is False and meta["BN"] == 8
    w, pe = torch.randn(2, 32, 8), torch.randn(4, 8)
    launches.pool(k, x, 8, 2, w, pe, heads_kv=2, bi=16, linear=True, has_pe=True, widen=False)
    assert k.calls[-1][1][2] is w and k.calls[-1][1][3] is pe and k.calls[-1][2]["HAS_PE"]


def test_compressed_blocks_counts_complete_blocks_only():
    desc = make_desc(needs_compressed_kv=True, cmp_block=8, cmp_stride=4)
    assert [launches.compressed_blocks(desc, T) for T in (0, 7, 8, 11, 12, 20)] == [0, 0, 1, 1, 2, 4]


def test_runtime_exposes_launches():
    assert runtime.launches is launches
