"""The decode runtime's host logic (specgen.runtime.decode_cache / decode_step), tested directly with plain torch:
no kernel runs here (descriptors carry no kernels, the prefill's pooling is a torch stand-in), so no interpreter.
The kernels and the whole step are tested through the generated modules (tests/test_decode*.py, generated/)."""

import dataclasses
import subprocess
import sys

import pytest
import torch

from specgen import runtime
from specgen.runtime import decode_cache, decode_step
from specgen.runtime.decode_cache import Cache, completed_blocks, index_key_store, pool_blocks
from specgen.runtime.decode_descriptor import DecodeDescriptor

HKV, DQK, DV, L, STRIDE, PAGE = 2, 8, 4, 4, 2, 16


def _torch_pool(x, D, NC, weight=None, pe=None):
    """The prefill pooling (the module's `_pool`, a kernel) as plain torch: mean of blocks l with stride d."""
    blocks = torch.stack([x[:, i * STRIDE:i * STRIDE + L] for i in range(NC)], dim=1)  # [B, NC, l, Hkv, D]
    return (blocks.float().sum(dim=2) * (1.0 / L)).to(x.dtype)


def descriptor(**kw) -> DecodeDescriptor:
    """A small NSA-like descriptor (kv: independent, mean pooling, compression-scored selection, window)."""
    base = dict(
        spec_name="rt_small", cache_class="NSACache", fn="nsa_decode", dtype=torch.float16, hq=4, hkv=HKV, group=2,
        dqk=DQK, dv=DV, branch_names=("compression", "selection", "window"), softmax_scale=DQK ** -0.5,
        gated=True, mla=False, page_size=PAGE, max_q_len=4,
        cache_tensors={"k_cmp": DQK, "v_cmp": DV, "k_slc": DQK, "v_slc": DV, "k_win": DQK, "v_win": DV},
        ring_tensors=("k_cmp", "v_cmp"), ring=L + 4, compressed=True, cmp_branch=True, cmp_block=L,
        cmp_stride=STRIDE, pool_kind="mean", position_embedding=False, k_cmp="k_cmp", v_cmp="v_cmp",
        pool_weights=(), scorer="compression", scoring="partials", overlap_chunks=8 // STRIDE,
        overlap_blocks=L // STRIDE, overlap_spill=(8 // STRIDE + L // STRIDE - 2) // (8 // STRIDE), sel_block=8, top_k=2, k_slc="k_slc", v_slc="v_slc", indexer=False,
        fp8=False, idx_heads=0, idx_dim=0, idx_scale=None, index_bs=0, index_hp=0, window=8, k_win="k_win",
        v_win="v_win", split_tiles={"compression": 64, "window": 64, "selection": 16}, split_waves=2, max_splits=64,
        max_gp=128, num_stages=2, selection_form="base", index_form="tile", topk_form="radix", topn_form="row",
        widen=False, pool=_torch_pool, branch_kernels={}, combine_kernel=None)
    base.update(kw)
    return DecodeDescriptor(**base)


def cache_class(d: DecodeDescriptor):
    return type(d.cache_class, (Cache,), {"DESCRIPTOR": d})


SHARED = dict(cache_tensors={"k": DQK, "v": DV}, ring_tensors=(), ring=L + 4, k_cmp="k", v_cmp="v", k_slc="k",
              v_slc="v", k_win="k", v_win="v")


def tokens(d, B, T, gen):
    return {name: torch.randn(B, T, HKV, dim, generator=gen).to(d.dtype) for name, dim in d.cache_tensors.items()}


# ---------------------------------------------------------------------------------------------------------------
# Pure helpers
# ---------------------------------------------------------------------------------------------------------------

def test_completed_blocks():
    assert [completed_blocks(T, 4, 2) for T in range(9)] == [0, 0, 0, 0, 1, 1, 2, 2, 3]
    assert completed_blocks(32, 32, 16) == 1 and completed_blocks(31, 32, 16) == 0


def test_pool_blocks_mean_and_linear_with_position_embedding():
    gen = torch.Generator().manual_seed(0)
    blocks = torch.randn(5, L, HKV, DQK, generator=gen).half()
    got = pool_blocks(descriptor(), blocks)
    assert got.dtype == torch.float16
    torch.testing.assert_close(got.float(), blocks.float().mean(dim=1), rtol=1e-3, atol=1e-3)
    weight = torch.randn(HKV, L * DQK, DV, generator=gen).half()
    pe = torch.randn(L, DQK, generator=gen).half()
    want = torch.stack([torch.stack([(blocks[n, :, g].float() + pe.float()).reshape(-1) @ weight[g].float()
                                     for g in range(HKV)]) for n in range(5)])
    got = pool_blocks(descriptor(pool_kind="linear", position_embedding=True), blocks, weight, pe)
    torch.testing.assert_close(got.float(), want, rtol=1e-2, atol=1e-2)
    want = torch.einsum("nlgd,glde->nge", blocks.float(), weight.float().view(HKV, L, DQK, DV))
    got = pool_blocks(descriptor(pool_kind="linear"), blocks, weight)
    torch.testing.assert_close(got.float(), want, rtol=1e-2, atol=1e-2)


def test_index_key_store():
    x = torch.randn(2, 3, HKV, 8)
    vals, scale = index_key_store(descriptor(), x)
    assert vals.dtype == torch.float16 and scale is None
    vals, scale = index_key_store(descriptor(fp8=True), x)
    want, want_scale = runtime.fp8_rows(x)
    assert vals.dtype == torch.float8_e4m3fn and torch.equal(vals.view(torch.uint8), want.view(torch.uint8))
    assert torch.equal(scale, want_scale)


def test_split_rows_and_topk_segments():
    d = descriptor(group=6)
    assert decode_step.split_rows(d, "selection", 3) == (1, 16, 1)
    assert decode_step.split_rows(d, "window", 3) == (4, 8, 1)
    assert decode_step.split_rows(descriptor(group=256, max_gp=64), "window", 1) == (1, 64, 4)
    # Default segments: ~1024 programs in all, at most 32 per row, >= 1024 units each, BS a power of two dividing.
    assert decode_step.topk_segments(40_000, 1, None, 1024, 32, 16) == (2048, 20, 1024, 16)
    assert decode_step.topk_segments(500, 8, None, 1024, 32, 16) == (1024, 1, 1024, 1)
    assert decode_step.topk_segments(40, 6, 7, 1024, 32, 4) == (7, 6, 1, 4)
    assert decode_step.topk_segments(1, 6, None, 1024, 32, 16) == (1024, 1, 1024, 1)


# ---------------------------------------------------------------------------------------------------------------
# The cache: layout, rows, prefill and append (torch ops only)
# ---------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("paged", [False, True])
def test_cache_layout(paged):
    d = descriptor()
    C = cache_class(d)
    cache = C(3, num_pages=7) if paged else C(3, max_seqlen=20)
    rows = (7, PAGE) if paged else (3, 20)
    for name, dim in d.cache_tensors.items():
        want = (3, d.ring) if name in d.ring_tensors else rows
        assert cache.tensors[name].shape == (*want, HKV, dim) and cache.tensors[name].dtype == torch.float16
    cap = [2 * PAGE] * 3 if paged else [20] * 3
    assert cache.capacity == cap and cache.capacity_t.tolist() == cap and cache.max_context == cap[0]
    assert cache.nc_cap == completed_blocks(cap[0], L, STRIDE) + 1
    assert cache.kc.shape == (3, cache.nc_cap, HKV, DQK) and cache.vc.shape == (3, cache.nc_cap, HKV, DV)
    assert cache.tcap == (0 if paged else 20) and cache.error_flag.tolist() == [0]
    assert not hasattr(cache, "pool") and not hasattr(cache, "k_idx_scale")
    if paged:
        assert cache.block_table.tolist() == [[0, 1], [2, 3], [4, 5]]
    # Without the compression branch: keys pooled for selection scoring only; no pooling at all without compression.
    cache = cache_class(descriptor(cmp_branch=False))(1, max_seqlen=8)
    assert hasattr(cache, "kc") and not hasattr(cache, "vc")
    cache = cache_class(descriptor(compressed=False, cmp_branch=False))(1, max_seqlen=8)
    assert not hasattr(cache, "kc")


def test_rows_paged_and_contiguous():
    d = descriptor()
    table = torch.tensor([[5, 2, -1], [0, 3, 4]], dtype=torch.int32)
    cache = cache_class(d)(2, num_pages=6, block_table=table)
    pos = torch.tensor([[0, 17, 31], [15, 16, 40]])
    assert cache._rows(pos).tolist() == [[5 * PAGE, 2 * PAGE + 1, 2 * PAGE + 15], [15, 3 * PAGE, 4 * PAGE + 8]]
    assert cache._ring_rows(pos).tolist() == [[0, 1, 7], [8 + 7, 8 + 0, 8 + 0]]
    flat = cache_class(d)(2, max_seqlen=50)
    assert flat._rows(pos).tolist() == [[0, 17, 31], [65, 66, 90]]
    table[0, 0] = 1
    assert cache.block_table[0, 0] == 5, "the cache keeps its own copy of the table"


@pytest.mark.parametrize("paged", [False, True])
@pytest.mark.parametrize("layout", ["independent", "shared"])
def test_prefill_and_append_store_rows_and_pool_completed_blocks(paged, layout):
    d = descriptor(**(SHARED if layout == "shared" else {}))
    C = cache_class(d)
    gen = torch.Generator().manual_seed(1)
    B, T, lens, n = 2, 11, [11, 6], 3
    cache = C(B, num_pages=6, block_table=torch.tensor([[4, 1, 0], [2, 5, 3]], dtype=torch.int32)) if paged \
        else C(B, max_seqlen=24)
    prompt = tokens(d, B, T, gen)
    assert cache.prefill(seqlens=lens, **prompt) is cache
    assert cache.host_seqlens == lens and cache.seqlens.tolist() == lens
    new = tokens(d, B, n, gen)
    cache.append(**new)
    assert cache.host_seqlens == [14, 9] and cache.seqlens.tolist() == [14, 9]
    for b, Lb in enumerate(lens):
        full = {k: torch.cat([prompt[k][b, :Lb], new[k][b]]) for k in d.cache_tensors}
        pos = torch.arange(Lb + n)
        for k, x in full.items():
            if k in d.ring_tensors:
                keep = pos[-d.ring:]
                got = cache.tensors[k][b, keep % d.ring]
                assert torch.equal(got, x[keep]), (k, b)
            else:
                got = cache._flat(k)[cache._rows(pos[None].expand(B, -1))[b]]
                assert torch.equal(got, x), (k, b)
        # Every block complete at the new length is pooled: those of the prompt by the prefill's pooling (blocks
        # of the padded prompt past the length are rewritten by the append that completes them), the rest by
        # the append.
        for i in range(completed_blocks(Lb + n, L, STRIDE)):
            want = full[d.k_cmp][i * STRIDE:i * STRIDE + L].float().mean(0)
            torch.testing.assert_close(cache.kc[b, i].float(), want, rtol=1e-3, atol=1e-3)
            want = full[d.v_cmp][i * STRIDE:i * STRIDE + L].float().mean(0)
            torch.testing.assert_close(cache.vc[b, i].float(), want, rtol=1e-3, atol=1e-3)


def test_append_under_capture_clamps_and_flags_capacity(monkeypatch):
    d = descriptor()
    cache = cache_class(d)(2, max_seqlen=8)
    gen = torch.Generator().manual_seed(2)
    cache.prefill(seqlens=[6, 2], **tokens(d, 2, 6, gen))
    monkeypatch.setattr(runtime, "no_host_reads", lambda: True)
    monkeypatch.setattr(cache, "host_seqlens", [0, 0])  # what a replayed graph's mirror would still say
    cache.append(**tokens(d, 2, 4, gen))
    assert cache.seqlens.tolist() == [8, 6] and cache.error_flag.item() == runtime.FLAG_CAPACITY
    with pytest.raises(runtime.ArgumentError):
        cache.check_errors()
    assert cache.error_flag.item() == 0


def test_linear_pool_weights_are_required_and_checked():
    d = descriptor(pool_kind="linear", position_embedding=True, pool_weights=(
        ("w_pool_k", (HKV, L * DQK, DQK), torch.float16), ("w_pool_v", (HKV, L * DV, DV), torch.float16),
        ("pe_pool_k", (L, DQK), torch.float16), ("pe_pool_v", (L, DV), torch.float16)))
    C = cache_class(d)
    w = {"w_pool_k": torch.zeros(HKV, L * DQK, DQK).half(), "w_pool_v": torch.zeros(HKV, L * DV, DV).half(),
         "pe_pool_k": torch.zeros(L, DQK).half(), "pe_pool_v": torch.zeros(L, DV).half()}
    cache = C.__new__(C)
    cache._setup(1, 8, None, None, None, None, None, w)
    assert set(cache.pool) == set(w)
    for missing in w:
        cache = C.__new__(C)
        with pytest.raises(runtime.ArgumentError, match=missing):
            cache._setup(1, 8, None, None, None, None, None, {**w, missing: None})
    cache = C.__new__(C)
    with pytest.raises(runtime.ArgumentError, match="w_pool_v"):
        cache._setup(1, 8, None, None, None, None, None, {**w, "w_pool_v": w["w_pool_k"]})


def test_cache_argument_errors():
    d = descriptor()
    C = cache_class(d)
    with pytest.raises(runtime.ArgumentError, match="page_size"):
        C(1, max_seqlen=8, page_size=PAGE * 2)
    with pytest.raises(runtime.ArgumentError, match="dtype"):
        C(1, max_seqlen=8, dtype=torch.float32)
    with pytest.raises(runtime.ArgumentError, match="cannot hold 3 sequences"):
        C(3, num_pages=2)
    cache = C(2, max_seqlen=8)
    gen = torch.Generator().manual_seed(3)
    x = tokens(d, 2, 4, gen)
    with pytest.raises(runtime.ArgumentError, match="unexpected arguments"):
        cache.prefill(**x, k_extra=x["k_cmp"])
    with pytest.raises(runtime.ArgumentError, match="v_win"):
        cache.prefill(**{k: v for k, v in x.items() if k != "v_win"})
    with pytest.raises(runtime.ArgumentError, match="pass the prompt"):
        cache.prefill()
    with pytest.raises(runtime.ArgumentError, match="dtype|float16"):
        cache.prefill(**{**x, "k_slc": x["k_slc"].float()})
    cache.prefill(**x)
    with pytest.raises(runtime.ArgumentError, match="q_len|max_q_len|4"):
        cache.append(**tokens(d, 2, 5, gen))
    with pytest.raises(runtime.ArgumentError):
        cache.append(**tokens(d, 2, 3, gen)).append(**tokens(d, 2, 3, gen))  # past max_seqlen 8
    assert cache.host_seqlens == [7, 7]


def test_step_argument_checks():
    d = descriptor()
    cache = cache_class(d)(2, max_seqlen=16)
    other = cache_class(descriptor())(2, max_seqlen=16)
    q = torch.zeros(2, 1, 4, DQK, dtype=torch.float16)
    gates = torch.zeros(2, 1, 4, 3, dtype=torch.float16)
    args = dict(cache_seqlens=None, block_table=None, gates=gates, q_idx=None, w_idx=None, out=None, num_splits=None)
    with pytest.raises(runtime.ArgumentError, match="`cache` must be a NSACache, got NSACache"):
        decode_step.check_step_args(d, q, other, **args)
    with pytest.raises(runtime.ArgumentError, match="`cache` must be a NSACache, got dict"):
        decode_step.check_step_args(d, q, {}, **args)
    with pytest.raises(runtime.ArgumentError, match="`q`"):
        decode_step.check_step_args(d, q[..., :4], cache, **args)
    with pytest.raises(runtime.ArgumentError, match="gates"):
        decode_step.check_step_args(d, q, cache, **{**args, "gates": None})
    cache.prefill(**tokens(d, 2, 3, torch.Generator().manual_seed(4)))
    with pytest.raises(runtime.ArgumentError, match="block_table` given for a contiguous cache"):
        decode_step.check_step_args(d, q, cache, **{**args, "block_table": torch.zeros(2, 1, dtype=torch.int32)})
    with pytest.raises(runtime.ArgumentError, match="num_splits"):
        decode_step.check_step_args(d, q, cache, **{**args, "num_splits": 0})
    q2, g2, _, _, seqlens, table, out, splits = decode_step.check_step_args(d, q, cache, **args)
    assert seqlens is cache.seqlens and table is cache.block_table and splits is None
    assert out.shape == (2, 1, 4, DV) and out.dtype == torch.float16
    d_idx = descriptor(indexer=True, idx_heads=2, idx_dim=8)
    cache = cache_class(d_idx)(2, max_seqlen=16)
    cache.prefill(**tokens(d_idx, 2, 3, torch.Generator().manual_seed(5)))
    with pytest.raises(runtime.ArgumentError, match="q_idx"):
        decode_step.check_step_args(d_idx, q, cache, **args)


# ---------------------------------------------------------------------------------------------------------------
# Layering
# ---------------------------------------------------------------------------------------------------------------

def test_decode_runtime_imports_nothing_of_the_generator():
    code = ("import sys\n"
            "import specgen.runtime.decode_step, specgen.runtime.decode_cache, specgen.runtime.decode_descriptor\n"
            "bad = sorted(m for m in sys.modules if m.startswith('specgen.') and not m.startswith('specgen.runtime'))\n"
            "bad += sorted({'yaml', 'jinja2', 'sympy'} & set(sys.modules))\n"
            "assert not bad, bad\n")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


def test_descriptor_is_frozen():
    d = descriptor()
    with pytest.raises(dataclasses.FrozenInstanceError):
        d.hq = 8
    assert d.n_branches == 3 and decode_cache.Cache.DESCRIPTOR is None
