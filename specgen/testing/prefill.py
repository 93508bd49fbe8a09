"""Chunked-prefill checks (docs/varlen.md, "Chunked prefill"): a ragged batch of prompts prefilled into a cache in
chunks (`<family>_prefill`) against the same prompts written by one `cache.prefill` and run by one packed forward.

  - every chunk's output against the float64 reference of its sequence's whole prefix (the chunk's selection first
    checked for validity against the reference scores, then fed to the reference) and against the single packed
    forward of the whole prompts (same selection required on the CPU, where both run the same arithmetic);
  - the cache afterwards equal, bit for bit, to the single prefill's: every stored tensor (poisoned with NaN before,
    so a row written by one and not the other shows), the fp8 index-key scales, the pooled blocks every sequence has
    and the lengths (device and host);
  - a decode step on both caches after it: the same bits.
"""

from __future__ import annotations

import torch

from .. import reference
from ..model.spec import Spec
from ..runtime import prefill as prefill_runtime
from ..runtime.decode_cache import completed_blocks
from . import LSE_TOL, OUT_TOL, SELECT_TOL, fresh_seed, test_device
from .decode import PER_QUERY, POOL_WEIGHTS, shuffled_block_table


def _bits(x: torch.Tensor) -> torch.Tensor:
    """A tensor's bytes (NaN poison compares equal to itself; fp8 has no torch.equal)."""
    return x.contiguous().view(torch.uint8)


def _make_cache(module, spec, B, lens, paged, gen, device, pool, slack=3, pages="shuffled"):
    Cache = getattr(module, f"{spec.family.upper()}Cache")
    if paged:
        num_pages, table = shuffled_block_table(lens, spec.decode.page_size, gen)
        if pages == "consecutive":   # each sequence's pages in pool order (a chunk's keys are read in place)
            used = table >= 0
            table = torch.where(used, (used.flatten().cumsum(0) - 1).view(table.shape).to(torch.int32), -1)
        cache = Cache(B, num_pages=num_pages, block_table=table.to(device), device=device, **pool)
    else:
        cache = Cache(B, max_seqlen=max(lens) + slack, device=device, **pool)
    nan = float("nan")
    for x in cache.tensors.values():
        if x.dtype.is_floating_point and x.dtype != torch.float8_e4m3fn:
            x.fill_(nan)
    for attr in ("kc", "vc"):
        if hasattr(cache, attr):
            getattr(cache, attr).fill_(nan)
    return cache


def check_chunked_prefill(module, spec: Spec, schedule: list[list[int]], *, paged: bool = False,
                          device: str | None = None, seed: int | None = None, packed: bool = True,
                          decode_q_len: int = 1, query_chunk: int | None = None, pages: str = "shuffled",
                          key_read: str | None = None) -> dict:
    """`schedule[r][i]`: the tokens sequence i gets in round r (0: an empty chunk); prompt i is their sum. With
    `packed=False` every round must give all sequences the same count (a batched [B, S, ...] call). Paged caches:
    `pages` "shuffled" (a random block table) or "consecutive" (each sequence's pages in pool order); `key_read`
    sets runtime.prefill.KEY_READ for the chunked calls ("gather": the paged keys gathered whatever the table).
    Returns the seed, the errors and the bytes the key gathers moved."""
    device = device or test_device()
    seed = fresh_seed() if seed is None else seed
    B = len(schedule[0])
    lens = [sum(r[i] for r in schedule) for i in range(B)]
    where = (f"[spec {spec.name}, chunked prefill {'paged' if paged else 'contiguous'}, "
             f"{'packed' if packed else 'batched'}, schedule={schedule}, seed={seed} (SPECGEN_TEST_SEED={seed} "
             f"reproduces)]")
    gen = torch.Generator(device="cpu").manual_seed(seed)
    Tm = max(lens) + decode_q_len
    dtype = module.DTYPE
    x64 = {k: v for k, v in reference.make_inputs(spec, B, Tm, generator=gen).items()
           if k in PER_QUERY or k in POOL_WEIGHTS}
    for name, dim in module.CACHE_TENSORS.items():
        x64[name] = torch.randn(B, Tm, spec.heads.kv, dim, dtype=torch.float64, generator=gen)
    inputs = {k: v.to(device=device, dtype=dtype) for k, v in x64.items()}
    exact = {k: v.to(torch.float64) for k, v in inputs.items()}
    pool = {k: inputs[k] for k in POOL_WEIGHTS if k in inputs}
    final = [n + decode_q_len for n in lens]
    one = _make_cache(module, spec, B, final, paged, torch.Generator().manual_seed(seed), device, pool, pages=pages)
    chunked = _make_cache(module, spec, B, final, paged, torch.Generator().manual_seed(seed), device, pool,
                          pages=pages)
    names = list(module.CACHE_TENSORS)
    prefill = getattr(module, f"{spec.family}_prefill")
    forward = getattr(module, f"{spec.family}_forward")
    decode = getattr(module, f"{spec.family}_decode")
    selects = spec.selection is not None

    # One prefill: the cache's prefill, and one packed forward of the whole prompts.
    one.prefill(seqlens=lens, **{n: inputs[n][:, :max(lens)] for n in names})
    cu = torch.tensor([0] + lens, dtype=torch.long).cumsum(0).to(torch.int32).to(device)
    whole = {k: (v if k in POOL_WEIGHTS else torch.cat([v[b, :lens[b]] for b in range(B)]))
             for k, v in inputs.items()}
    res = forward(**whole, cu_seqlens=cu, max_seqlen=max(max(lens), 1), return_lse=True, return_indices=selects)
    single_out, single_idx = res[0], (res[2] if selects else None)

    held = [0] * B
    got = [[] for _ in range(B)]
    got_lse = [[] for _ in range(B)]
    got_idx = [[] for _ in range(B)]
    nan = float("nan")
    gathered = 0
    for r, chunk in enumerate(schedule):
        at = f"{where} round {r} (chunk {chunk}, held {held})"
        if packed:
            cu_q = torch.tensor([0] + chunk, dtype=torch.long).cumsum(0).to(torch.int32).to(device)
            kw = {n: torch.cat([inputs[n][b, held[b]:held[b] + chunk[b]] for b in range(B)])
                  for n in names + [p for p in PER_QUERY if p in inputs]}
            out = torch.full((sum(chunk), spec.heads.q, spec.head_dim.v), nan, dtype=dtype, device=device)
            extra = dict(cu_seqlens_q=cu_q, max_seqlen_q=max(max(chunk), 1))
        else:
            S = chunk[0]
            assert all(c == S for c in chunk), "a batched round gives every sequence the same chunk"
            kw = {n: torch.stack([inputs[n][b, held[b]:held[b] + S] for b in range(B)])
                  for n in names + [p for p in PER_QUERY if p in inputs]}
            out = torch.full((B, S, spec.heads.q, spec.head_dim.v), nan, dtype=dtype, device=device)
            extra = {}
        before, read = prefill_runtime.GATHERED["bytes"], prefill_runtime.KEY_READ
        prefill_runtime.KEY_READ = key_read or read
        try:
            o, lse, idx = prefill(kw.pop("q"), chunked, **kw, out=out, return_lse=True, return_indices=True, **extra)
        finally:
            prefill_runtime.KEY_READ = read
        gathered += prefill_runtime.GATHERED["bytes"] - before
        assert o.data_ptr() == out.data_ptr(), f"out= was not used {at}"
        assert torch.isfinite(o).all(), f"non-finite prefill output (NaN-poisoned memory read?) {at}"
        if not packed:
            o, lse = o.flatten(0, 1), lse.flatten(0, 1)
            idx = idx.flatten(0, 1) if idx is not None else None
        start = 0
        for b in range(B):
            n = chunk[b]
            got[b].append(o[start:start + n])
            got_lse[b].append(lse[start:start + n])
            if selects:
                got_idx[b].append(idx[start:start + n])
            start += n
        held = [h + c for h, c in zip(held, chunk)]
        assert chunked.host_seqlens == held and chunked.seqlens.tolist() == held, f"cache lengths {at}"

    # Outputs: the float64 reference of each whole prompt, and the single forward.
    worst = 0.0
    for b in range(B):
        if lens[b] == 0:
            continue
        o_b, lse_b = torch.cat(got[b]), torch.cat(got_lse[b])
        ex = {k: (v if k in POOL_WEIGHTS else v[b:b + 1, :lens[b]]) for k, v in exact.items()}
        sel = torch.cat(got_idx[b])[None] if selects else None
        if selects:
            scored = reference.nsa_forward(spec, **ex, query_chunk=query_chunk)
            try:
                reference.check_selection(spec, sel.cpu(), scored.scores.cpu(), lens[b], tol=SELECT_TOL[dtype])
            except AssertionError as e:
                raise AssertionError(f"sequence {b}: {e} {where}") from None
        ref = reference.nsa_forward(spec, **ex, indices=sel, query_chunk=query_chunk)
        err = reference.rel_err(o_b[None].double().cpu(), ref.out.cpu())
        assert err < OUT_TOL[dtype], f"sequence {b}: chunked output rel err {err:.3e} vs float64 reference {where}"
        worst = max(worst, err)
        for c, branch in enumerate(spec.branches):
            a, rl = lse_b[None, ..., c].double().cpu(), ref.lse[..., c].cpu()
            empty = torch.isinf(rl)
            assert torch.equal(torch.isinf(a) & (a < 0), empty), f"{branch}: -inf lse rows differ {where}"
            if (~empty).any():
                e = (a[~empty] - rl[~empty]).abs().max().item()
                assert e < LSE_TOL[dtype], f"{branch}: lse abs err {e:.3e} sequence {b} {where}"
    chunk_out = torch.cat([torch.cat(g) for g in got])
    rows = torch.ones(chunk_out.shape[0], dtype=torch.bool, device=chunk_out.device)
    if selects:
        chunk_idx = torch.cat([torch.cat(g) for g in got_idx])
        rows = (chunk_idx == single_idx).flatten(1).all(dim=1)
        if device == "cpu":
            assert bool(rows.all()), f"chunked selection differs from the single prefill's {where}"
    single_err = reference.rel_err(chunk_out[rows].double().cpu(), single_out[rows].double().cpu()) if rows.any() \
        else 0.0
    assert single_err < 2 * OUT_TOL[dtype], f"chunked vs single prefill rel err {single_err:.3e} {where}"

    # The cache: every stored tensor bit for bit, the pooled blocks each sequence has, the lengths.
    assert one.host_seqlens == chunked.host_seqlens and one.seqlens.tolist() == chunked.seqlens.tolist(), where
    for name in one.tensors:
        assert torch.equal(_bits(one.tensors[name]), _bits(chunked.tensors[name])), f"cache tensor {name} {where}"
    if hasattr(one, "k_idx_scale"):
        assert torch.equal(one.k_idx_scale, chunked.k_idx_scale), f"fp8 index-key scales {where}"
    for attr in ("kc", "vc"):
        if hasattr(one, attr):
            for b in range(B):
                nc = completed_blocks(lens[b], spec.compression.block, spec.compression.stride)
                assert torch.equal(_bits(getattr(one, attr)[b, :nc]), _bits(getattr(chunked, attr)[b, :nc])), \
                    f"pooled {attr} of sequence {b} ({nc} blocks) {where}"

    # Decoding after it: the same bits from both caches.
    outs = []
    for cache in (one, chunked):
        cache.append(**{n: torch.stack([inputs[n][b, lens[b]:lens[b] + decode_q_len] for b in range(B)])
                        for n in names})
        kw = {n: torch.stack([inputs[n][b, lens[b]:lens[b] + decode_q_len] for b in range(B)])
              for n in PER_QUERY if n in inputs}
        outs.append(decode(kw.pop("q"), cache, **kw, return_indices=selects))
    a, b_ = (outs[0], outs[1]) if not selects else (outs[0][0], outs[1][0])
    assert torch.equal(_bits(a), _bits(b_)), f"decode after the chunked prefill differs {where}"
    if selects:
        assert torch.equal(outs[0][1], outs[1][1]), f"decode selection after the chunked prefill differs {where}"
    return {"seed": seed, "out_err": worst, "single_err": single_err, "gathered_bytes": gathered}


def check_prefill_argument_errors(module, spec: Spec, device: str | None = None) -> None:
    """Bad chunk arguments raise ArgumentError naming the argument before any kernel runs, and the cache stays as
    it was (bit for bit)."""
    import pytest

    from ..runtime import ArgumentError

    device = device or test_device()
    B, n = 2, 3
    Cache = getattr(module, f"{spec.family.upper()}Cache")
    prefill = getattr(module, f"{spec.family}_prefill")
    gen = torch.Generator().manual_seed(0)
    x = {k: v.to(device=device, dtype=module.DTYPE) for k, v in
         reference.make_inputs(spec, 1, 2 * n, generator=gen).items() if k in PER_QUERY or k in POOL_WEIGHTS}
    pool = {k: x.pop(k) for k in list(x) if k in POOL_WEIGHTS}
    for name, dim in module.CACHE_TENSORS.items():
        x[name] = torch.randn(1, 2 * n, spec.heads.kv, dim, generator=gen).to(device=device, dtype=module.DTYPE)
    good = {k: v[0] for k, v in x.items()}          # packed: sequence 0 gets n tokens, sequence 1 n
    cu = torch.tensor([0, n, 2 * n], dtype=torch.int32, device=device)
    cache = Cache(B, max_seqlen=8, device=device, **pool)
    paged = Cache(B, num_pages=2, device=device, **pool)
    before = {k: v.clone() for k, v in cache.tensors.items()}

    def call(c=cache, **change):
        kw = dict(good, cu_seqlens_q=cu, max_seqlen_q=n)
        kw.update(change)
        kw = {k: v for k, v in kw.items() if v is not None or k in ("cu_seqlens_q", "max_seqlen_q")}
        return prefill(kw.pop("q"), c, **kw)

    def bad(match, c=cache, **change):
        with pytest.raises(ArgumentError, match=match):
            call(c, **change)

    first_kv = next(iter(module.CACHE_TENSORS))
    bad("cache", c=object())
    bad("q", q=good["q"].float() if module.DTYPE != torch.float32 else good["q"].half())     # wrong dtype
    bad("q", q=good["q"][:, :1])                                                              # wrong heads
    bad(first_kv, **{first_kv: good[first_kv][:-1]})                                          # mismatched length
    bad(first_kv, **{first_kv: None})                                                         # missing
    bad("unexpected", extra_tensor=good[first_kv])
    bad("cu_seqlens_q", cu_seqlens_q=torch.tensor([0, 2 * n], dtype=torch.int32, device=device), max_seqlen_q=2 * n)
    bad("cu_seqlens", cu_seqlens_q=cu.long())
    bad("capacity", c=Cache(B, max_seqlen=n - 1, device=device, **pool))                     # chunk longer than cache
    bad("cache_seqlens", cache_seqlens=torch.tensor([1, 0], dtype=torch.int32, device=device))
    bad("block_table", block_table=torch.zeros((B, 1), dtype=torch.int32, device=device))     # contiguous cache
    bad("block_table", c=paged, block_table=torch.tensor([[1], [0]], dtype=torch.int32, device=device))
    bad("out", out=torch.empty((2 * n, spec.heads.q, spec.head_dim.v + 1), dtype=module.DTYPE, device=device))
    if spec.gated:
        bad("gates", gates=None)
    if "q_idx" in good:
        bad("q_idx", q_idx=None)
    for k, v in before.items():
        assert torch.equal(_bits(v), _bits(cache.tensors[k])), f"a refused call changed cache tensor {k}"
    assert cache.host_seqlens == [0, 0] and cache.seqlens.tolist() == [0, 0]
