"""The block-outer selection's work list in its two forms (runtime.selection.WORKLIST_FORMS; docs/selection_order.md,
"Work list forms"): the Triton counting sort (runtime.worklist) against the torch sort, every output bit for bit,
on random causal selections (ascending, unique, -1 padding, some lists short), padded and packed callers, chunks
of the query rows (t0 > 0, strided views), forced slots left out, and a kv-order module's forward and backward
under either form. The tests' chunks and tiles are small (runtime.worklist.CHUNK_ENTRIES, TILE_PROGRAMS) so a
program walks several chunks and a row several tiles at tiny shapes; on a GPU the same tests run compiled, and
the `gpu` ones at Llama-3-8B's selection sizes."""

from __future__ import annotations

import pytest
import torch

import specgen
from specgen import runtime, testing
from specgen.compile.plan import make_plan
from specgen.compile.variants import load_variant
from specgen.model.spec import load_spec, replace
from specgen.runtime import selection, worklist
from specgen.runtime.varlen import Layout

FIELDS = ("qpos", "slot", "item_seg", "item_start", "item_end", "n_items", "seg_first_item", "seg_items")


def assert_same(want, got, where: str) -> None:
    assert len(want) == len(got) == len(FIELDS)
    for name, a, b in zip(FIELDS, want, got):
        if isinstance(a, int):
            assert a == b, f"{name}: {a} != {b} {where}"
            continue
        assert a.dtype == b.dtype and a.shape == b.shape, f"{name}: {a.dtype} {a.shape} / {b.dtype} {b.shape} {where}"
        assert torch.equal(a, b), f"{name}: {(a != b).sum().item()} of {a.numel()} differ {where}"


def small_tiles(monkeypatch, chunk_entries: int, tile_programs: int) -> None:
    monkeypatch.setattr(worklist, "CHUNK_ENTRIES", chunk_entries)
    monkeypatch.setattr(worklist, "TILE_PROGRAMS", tile_programs)


# B, T, query rows (t0, t1) or None for all, Hkv, top_k, unit, tile_queries, chunk entries, tile programs, forced
# slots left out (the chunks' rows and padded slots differ: a [rows] vector broadcast the wrong way would show)
PADDED = [
    (2, 41, None, 3, 4, 8, 3, 32, 12, False),         # 8-row chunks, 3 a tile, 2 tiles a row
    (2, 41, None, 3, 4, 8, 3, 32, 12, True),
    (2, 70, (13, 60), 2, 5, 4, 8, 32, 8, True),       # a strided chunk of the rows (t0 = 13), k not a power of two
    (3, 21, None, 1, 5, 2, 2, 1024, 1024, False),     # the default sizes: one chunk
    (1, 150, (100, 150), 2, 16, 16, 64, 64, 8, True),  # Llama-3-8B's k; 4 rows a chunk
]


@pytest.mark.parametrize("B,T,rows,Hkv,K,unit,tile,chunk,programs,forced", PADDED)
def test_the_triton_form_is_the_torch_form(B, T, rows, Hkv, K, unit, tile, chunk, programs, forced, monkeypatch):
    small_tiles(monkeypatch, chunk, programs)
    seed = testing.fresh_seed()
    gen = torch.Generator().manual_seed(seed)
    full = testing.random_selection(B, T, Hkv, K, unit, gen, drop=0.3, device=testing.test_device())
    t0, t1 = rows or (0, T)
    idx = full[:, t0:t1]
    skip = (t0, 1, 2) if forced else None
    want = selection.kv_order_segments(idx, T, unit=unit, tile_queries=tile, skip_forced=skip)
    got = selection.kv_order_segments(idx, T, unit=unit, tile_queries=tile, skip_forced=skip, form="triton")
    where = f"[B={B} T={T} rows={rows} Hkv={Hkv} k={K} unit={unit} forced={forced} seed={seed}]"
    assert_same(want, got, where)
    real = int((want[2] >= 0).sum())
    assert real > Hkv, where   # several segments of real work
    QC, KP, CPT, NT = worklist.tiles_for(t1 - t0, K, B * Hkv)
    if chunk < 1024:
        assert CPT > 1 and NT > 1, where   # cursors handed across chunks, counts summed across tiles


def packed(lengths: list[int], Hkv: int, K: int, unit: int, gen, device):
    """(indices [1, total, Hkv, K], Layout) of a packed batch: each sequence's causal selection, units relative to
    it."""
    cu = torch.tensor([0] + lengths, dtype=torch.int32).cumsum(0).to(torch.int32)
    total = int(cu[-1])
    parts = [testing.random_selection(1, n, Hkv, K, unit, gen, drop=0.3) for n in lengths if n]
    idx = torch.cat(parts, dim=1) if parts else torch.full((1, 0, Hkv, K), -1, dtype=torch.int32)
    seq = torch.repeat_interleave(torch.arange(len(lengths)), torch.tensor(lengths))
    lay = Layout(cu.to(device), max(lengths), total, seq.to(device))
    return idx.to(device), lay


# sequence lengths (empty ones included), query rows, Hkv, top_k, unit, tile_queries, chunk entries, tile programs
PACKED = [
    ([5, 0, 37, 0, 19], None, 2, 4, 8, 3, 32, 4),
    ([0, 30, 1, 0, 44], (6, 70), 1, 6, 4, 5, 128, 1),
    ([0, 0], None, 2, 4, 8, 3, 16, 4),           # no rows at all
]


@pytest.mark.parametrize("lengths,rows,Hkv,K,unit,tile,chunk,programs", PACKED)
def test_the_triton_form_is_the_torch_form_packed(lengths, rows, Hkv, K, unit, tile, chunk, programs, monkeypatch):
    small_tiles(monkeypatch, chunk, programs)
    seed = testing.fresh_seed()
    gen = torch.Generator().manual_seed(seed)
    idx, lay = packed(lengths, Hkv, K, unit, gen, testing.test_device())
    t0, t1 = rows or (0, lay.total)
    cu_units, _, n_batch_units = lay.units(unit)
    args = (idx[:, t0:t1], lay.seq_of_token[t0:t1], cu_units, n_batch_units)
    want = selection.kv_order_segments_packed(*args, tile_queries=tile)
    got = selection.kv_order_segments_packed(*args, tile_queries=tile, form="triton")
    assert_same(want, got, f"[lengths={lengths} rows={rows} Hkv={Hkv} k={K} unit={unit} seed={seed}]")
    assert (int((want[2] >= 0).sum()) > Hkv) == (lay.total > 0)


def test_wide_sort_keys_give_the_same_list(monkeypatch):
    """Sort keys are 32 bits where units x chunk entries fit, else 64 (runtime.worklist.sorted_entries): both
    widths on one selection."""
    small_tiles(monkeypatch, 64, 8)
    gen = torch.Generator().manual_seed(testing.fresh_seed())
    device = testing.test_device()
    T, unit = 24, 4
    idx = testing.random_selection(2, T, 2, 5, unit, gen, drop=0.2, device=device)
    want = selection.kv_order_segments(idx, T, unit=unit, tile_queries=4)
    for key64 in (False, True):
        qpos, slot, offsets = worklist.sorted_entries(idx, -(-T // unit), key64=key64)
        assert_same(want, (qpos, slot, *selection._items(offsets, offsets.numel() - 1, idx.numel(), 4)), key64)


def test_empty_and_all_padding_selections():
    device = testing.test_device()
    for idx in (torch.full((1, 0, 2, 4), -1, dtype=torch.int32, device=device),
                torch.full((2, 7, 3, 4), -1, dtype=torch.int32, device=device)):
        want = selection.kv_order_segments(idx, 9, unit=4, tile_queries=2)
        assert_same(want, selection.kv_order_segments(idx, 9, unit=4, tile_queries=2, form="triton"), idx.shape)
        assert int((want[2] >= 0).sum()) == 0


def test_an_unknown_form_is_refused():
    idx = torch.zeros((1, 2, 1, 1), dtype=torch.int32)
    with pytest.raises(ValueError, match="`form` 'cuda'"):
        selection.kv_order_segments(idx, 2, unit=1, tile_queries=1, form="cuda")


def test_a_kv_order_module_trains_the_same_under_either_form(monkeypatch):
    """nsa_small at GQA group 2 in kv order, forward and backward, the plan's Triton work list against the
    sel_wl_torch variant's (the torch sort): output, selection and every gradient equal bit for bit. Query chunks of ~9 rows
    (t0 > 0) and 16-entry sort chunks (several a tile, several tiles)."""
    spec = replace(load_spec("specs/nsa_small.yaml"), name="nsa_wl_g2", branches=["compression", "selection"],
                   window=None, max_seqlen=256, **{"heads.q": 4, "heads.kv": 2, "head_dim.qk": 16,
                                                   "head_dim.v": 16, "selection.loop_order": "kv"})
    plan = make_plan(spec)
    assert plan.selection_order == plan.selection_bwd_order == "kv" and plan.sel_kv_worklist == "triton"
    hq, top_k, d = spec.heads.q, spec.selection.top_k, spec.head_dim.v
    monkeypatch.setattr(runtime.launches, "KV_PARTIAL_BYTES", 9 * hq * top_k * (d * 2 + 4))
    small_tiles(monkeypatch, 16, 4)
    tri, base = specgen.load(spec), load_variant(spec, ["sel_wl_torch"])
    assert 'worklist="triton"' in open(tri.__file__).read() and 'worklist="torch"' in open(base.__file__).read()
    B, T = 1, 37
    inputs, dout = testing._grad_inputs(base, spec, B, T, testing.test_device(), testing.fresh_seed())
    want = testing._forward_backward(testing._attention_fn(base, spec), spec, inputs, dout)
    got = testing._forward_backward(testing._attention_fn(tri, spec), spec, inputs, dout)
    assert want.keys() == got.keys()
    for name, a in want.items():
        assert torch.equal(a, got[name]), name


def _realistic(T: int):
    gen = torch.Generator("cuda").manual_seed(T)
    return testing.random_selection(1, T, 8, 16, 64, gen, initial=1, local=2)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (realistic sizes)")
@pytest.mark.parametrize("forced", [False, True])
def test_the_triton_form_at_llama_sizes(forced):
    """Llama-3-8B's selection (8 kv groups, 16 blocks of 64, the first and two local forced) at T = 16384: the
    compiled kernels (the cursors handed between threads across chunks) give the torch form's list, twice."""
    T = 16384
    idx = _realistic(T)
    skip = (0, 1, 2) if forced else None
    want = selection.kv_order_segments(idx, T, unit=64, tile_queries=64, skip_forced=skip)
    for _ in range(2):
        got = selection.kv_order_segments(idx, T, unit=64, tile_queries=64, skip_forced=skip, form="triton")
        assert_same(want, got, f"[T={T} forced={forced}]")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (realistic sizes)")
def test_the_triton_form_at_llama_sizes_packed():
    gen = torch.Generator("cuda").manual_seed(1)
    idx, lay = packed([9000, 0, 6977, 384], 8, 16, 64, gen, "cuda")
    cu_units, _, n_batch_units = lay.units(64)
    args = (idx, lay.seq_of_token, cu_units, n_batch_units)
    want = selection.kv_order_segments_packed(*args, tile_queries=64)
    assert_same(want, selection.kv_order_segments_packed(*args, tile_queries=64, form="triton"), "[packed]")
