"""Decode checks shared by the generated tests: decoding token by token after a prefill equals the prefill.

A cache is filled from a ragged batch of random prompts, then each step appends q_len new tokens per sequence and
decodes them. Every step's output must match the float64 reference over that sequence's whole prefix at its last
q_len rows (the decode's selection is first checked for validity against the reference scores, then fed to the
reference, as for the prefill), and the last step must match the generated prefill kernel at those rows.
The cache's unused memory and the prompts' padding are poisoned with NaN: reading a token outside a sequence, or
a pooled block that is not complete, makes the output non-finite.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .. import reference
from ..model.spec import Spec
from . import LSE_TOL, OUT_TOL, SELECT_TOL, fresh_seed, test_device

POOL_WEIGHTS = ("w_pool_k", "w_pool_v", "pe_pool_k", "pe_pool_v")
# Inputs given per new query (the rest are per token and go into the cache).
PER_QUERY = ("q", "gates", "q_idx", "w_idx")


@dataclass
class DecodeReport:
    seed: int
    out_err: float          # worst step, against the float64 reference
    prefill_err: float      # last step, against the generated prefill kernel (rows with the same selection)
    rows_compared: int


def _cache_and_fns(module, spec: Spec):
    return (getattr(module, f"{spec.family.upper()}Cache"), getattr(module, f"{spec.family}_decode"),
            getattr(module, f"{spec.family}_forward"))


def shuffled_block_table(lengths: list[int], page: int, gen: torch.Generator, spare: int = 2):
    """Pages for sequences of the given final lengths, in a random order (plus `spare` unused pages); -1 padded."""
    need = [max(1, -(-n // page)) for n in lengths]
    num_pages = sum(need) + spare
    perm = torch.randperm(num_pages, generator=gen).to(torch.int32)
    table = torch.full((len(lengths), max(need)), -1, dtype=torch.int32)
    used = 0
    for b, n in enumerate(need):
        table[b, :n] = perm[used:used + n]
        used += n
    return num_pages, table


def _rows(x: torch.Tensor, starts: list[int], n: int) -> torch.Tensor:
    return torch.stack([x[b, s:s + n] for b, s in enumerate(starts)])


@dataclass
class _Case:
    inputs: dict     # spec dtype, on the device
    exact: dict      # the same values in float64
    offsets: list    # per-query tensors hold sequence b's position p at row p - offsets[b]
    gen: torch.Generator
    seed: int
    where: str


def _decode_case(module, spec: Spec, prompt_lens: list[int], new_tokens: int, full_queries: bool, device: str,
                 seed: int | None, what: str) -> _Case:
    """Random inputs: per-token ones (the cache's) over `total` positions; per-query ones (q, gates, indexer q/w)
    over all positions when `full_queries` (the prefill comparison needs them), else only for the decoded ones:
    a realistic context never materialises [B, 64k, Hq, D] queries."""
    seed = fresh_seed() if seed is None else seed
    where = (f"[spec {spec.name}, {what}, device={device}, seed={seed} (SPECGEN_TEST_SEED={seed} reproduces)]")
    gen = torch.Generator(device="cpu").manual_seed(seed)
    B = len(prompt_lens)
    total = max(prompt_lens) + new_tokens
    rows = total if full_queries else new_tokens
    offsets = [0] * B if full_queries else list(prompt_lens)
    x64 = {k: v for k, v in reference.make_inputs(spec, B, rows, generator=gen).items()
           if k in PER_QUERY or k in POOL_WEIGHTS}
    for name, dim in module.CACHE_TENSORS.items():
        x64[name] = torch.randn(B, total, spec.heads.kv, dim, dtype=torch.float64, generator=gen)
    inputs = {k: v.to(device=device, dtype=module.DTYPE) for k, v in x64.items()}
    return _Case(inputs, {k: v.to(torch.float64) for k, v in inputs.items()}, offsets, gen, seed, where)


def check_decode(module, spec: Spec, prompt_lens: list[int], *, q_len: int = 1, steps: int = 2, paged: bool = False,
                 device: str | None = None, seed: int | None = None, num_splits: int | None = None,
                 query_chunk: int | None = None, compare_prefill: bool = True,
                 prefill_sequences: list[int] | None = None) -> DecodeReport:
    """`prefill_sequences`: which sequences the prefill-kernel comparison runs (default all; the interpreter
    runs a prefill's selection kernel once per query position, so large specs compare their shortest only)."""
    device = device or test_device()
    B = len(prompt_lens)
    final = [p + steps * q_len for p in prompt_lens]
    total = max(final)
    layout = "paged" if paged else "contiguous"
    case = _decode_case(module, spec, prompt_lens, steps * q_len, compare_prefill, device, seed,
                        what=f"decode {layout}, q_len={q_len}, prompts={prompt_lens}, steps={steps}")
    inputs, exact, where, dtype, offsets = case.inputs, case.exact, case.where, module.DTYPE, case.offsets
    Cache, decode, forward = _cache_and_fns(module, spec)
    names = list(module.CACHE_TENSORS)
    pool = {k: inputs[k] for k in POOL_WEIGHTS if k in inputs}
    nan = float("nan")

    if paged:
        num_pages, table = shuffled_block_table(final, spec.decode.page_size, case.gen)
        cache = Cache(B, num_pages=num_pages, block_table=table.to(device), device=device, **pool)
    else:
        cache = Cache(B, max_seqlen=total + 5, device=device, **pool)
    for x in cache.tensors.values():
        x.fill_(nan)
    for attr in ("kc", "vc"):
        if hasattr(cache, attr):
            getattr(cache, attr).fill_(nan)

    Tp = max(prompt_lens)
    prompt = {}
    for n in names:
        x = inputs[n][:, :Tp].clone()
        for b, p in enumerate(prompt_lens):
            x[b, p:] = nan  # padding of a ragged prompt: never read
        prompt[n] = x
    cache.prefill(seqlens=prompt_lens, **prompt)
    assert cache.host_seqlens == prompt_lens and cache.seqlens.tolist() == prompt_lens, f"prefill lengths {where}"

    lens = list(prompt_lens)
    worst = 0.0
    got = idx = None
    for step in range(steps):
        cache.append(**{n: _rows(inputs[n], lens, q_len) for n in names})
        lens = [n + q_len for n in lens]
        starts = [n - q_len - o for n, o in zip(lens, offsets)]
        kw = {n: _rows(inputs[n], starts, q_len) for n in PER_QUERY if n in inputs}
        out = torch.full((B, q_len, spec.heads.q, spec.head_dim.v), nan, dtype=dtype, device=device)
        result = decode(kw.pop("q"), cache, **kw, out=out, num_splits=num_splits, return_lse=True,
                        return_indices=True)
        got, lse, idx = result
        at = f"{where} at step {step}, lengths {lens}"
        assert got.data_ptr() == out.data_ptr(), f"out= was not used {at}"
        assert torch.isfinite(got).all(), f"non-finite decode output (NaN-poisoned memory was read?) {at}"
        assert cache.seqlens.tolist() == lens, f"cache lengths {cache.seqlens.tolist()} != {lens} {at}"

        ref_out, ref_lse = [], []
        for b in range(B):
            T, s0 = lens[b], starts[b]
            ex = {k: (v if k in POOL_WEIGHTS else v[b:b + 1, s0:s0 + q_len] if k in PER_QUERY else v[b:b + 1, :T])
                  for k, v in exact.items()}
            sel_b = idx[b:b + 1] if spec.selection is not None else None
            if sel_b is not None:
                scored = reference.nsa_forward(spec, **ex, query_chunk=query_chunk)
                try:
                    reference.check_selection(spec, sel_b.cpu(), scored.scores.cpu(), T, tol=SELECT_TOL[dtype])
                except AssertionError as e:
                    raise AssertionError(f"sequence {b}: {e} {at}") from None
            ref = reference.nsa_forward(spec, **ex, indices=sel_b, query_chunk=query_chunk)
            ref_out.append(ref.out)
            ref_lse.append(ref.lse)
        ref_out, ref_lse = torch.cat(ref_out), torch.cat(ref_lse)
        err = reference.rel_err(got.to(torch.float64).cpu(), ref_out.cpu())
        assert err < OUT_TOL[dtype], f"decode output rel err {err:.3e} >= {OUT_TOL[dtype]:.0e} {at}"
        worst = max(worst, err)
        for c, branch in enumerate(spec.branches):
            a, r = lse[..., c].to(torch.float64).cpu(), ref_lse[..., c].cpu()
            empty = torch.isinf(r)
            assert torch.equal(torch.isinf(a) & (a < 0), empty), f"{branch}: -inf lse where no key is visible {at}"
            if (~empty).any():
                e = (a[~empty] - r[~empty]).abs().max().item()
                assert e < LSE_TOL[dtype], f"{branch}: decode lse abs err {e:.3e} >= {LSE_TOL[dtype]:.0e} {at}"

    prefill_err, compared = 0.0, 0
    if compare_prefill:
        # The generated prefill over each whole sequence: its last q_len rows are this step's queries. Rows whose
        # selection differs (a near-tie ranked the other way by another summation order) are not comparable.
        mine, theirs = [], []
        chosen = list(range(B)) if prefill_sequences is None else [x % B for x in prefill_sequences]
        for b in chosen:
            T = lens[b]
            full = {k: (v if k in POOL_WEIGHTS else v[b:b + 1, :T]) for k, v in inputs.items()}
            res = forward(**full, return_indices=spec.selection is not None)
            o = res[0] if isinstance(res, tuple) else res
            rows = torch.ones(q_len, dtype=torch.bool, device=o.device)
            if spec.selection is not None:
                rows = (res[1][0, T - q_len:] == idx[b]).flatten(1).all(dim=1)
            mine.append(got[b][rows])
            theirs.append(o[0, T - q_len:][rows])
            compared += int(rows.sum())
        assert compared >= (len(chosen) * q_len + 1) // 2, f"only {compared} rows selected alike {where}"
        prefill_err = reference.rel_err(torch.cat(mine).double().cpu(), torch.cat(theirs).double().cpu())
        assert prefill_err < 2 * OUT_TOL[dtype], f"decode vs prefill kernel rel err {prefill_err:.3e} {where}"
    return DecodeReport(case.seed, worst, prefill_err, compared)


def check_decode_argument_errors(module, spec: Spec, device: str | None = None) -> None:
    """Bad cache or step input raises ArgumentError naming the argument and the fix, before any kernel runs."""
    import pytest

    from ..runtime import ArgumentError

    device = device or test_device()
    Cache, decode, _ = _cache_and_fns(module, spec)
    names = list(module.CACHE_TENSORS)
    page = spec.decode.page_size
    pool = {k: v.to(module.DTYPE) for k, v in reference.make_inputs(spec, 1, 1).items() if k in POOL_WEIGHTS}
    pool = {k: v.to(device) for k, v in pool.items()}

    def tokens(B, n, dtype=module.DTYPE):
        x = reference.make_inputs(spec, B, n, dtype=torch.float32)
        return {k: x[k].to(device=device, dtype=dtype) for k in names}, {k: x[k].to(device=device, dtype=module.DTYPE)
                                                                        for k in PER_QUERY if k in x}

    with pytest.raises(ArgumentError, match="points past the pool"):
        Cache(2, num_pages=4, block_table=torch.tensor([[0, 1], [2, 9]], dtype=torch.int32, device=device), **pool)
    with pytest.raises(ArgumentError, match="`block_table` must be int32"):
        Cache(2, num_pages=4, block_table=torch.tensor([[0, 1], [2, 3]], device=device), **pool)
    cache = Cache(2, num_pages=4, block_table=torch.tensor([[0, 1], [2, -1]], dtype=torch.int32, device=device),
                  **pool)
    new, _ = tokens(2, page + 1)
    with pytest.raises(ArgumentError, match="sequence 1 would hold .* its pages hold"):
        cache.prefill(**new)
    bad_dtype = torch.float64
    new, _ = tokens(2, 3, bad_dtype)
    with pytest.raises(ArgumentError, match=f"`{names[0]}` must be {module.DTYPE}"):
        cache.prefill(**new)
    new, per_query = tokens(2, 3)
    cache.prefill(seqlens=[3, 1], **new)
    too_many = spec.decode.max_q_len + 1
    with pytest.raises(ArgumentError, match="max_q_len"):
        cache.append(**tokens(2, too_many)[0])
    _, step = tokens(2, too_many)
    q = step.pop("q")
    with pytest.raises(ArgumentError, match="q_len=.*max_q_len"):
        decode(q, cache, **step)
    _, step = tokens(2, 2)
    q = step.pop("q")
    with pytest.raises(ArgumentError, match="sequence 1 holds 1 tokens.*cache.append"):
        decode(q, cache, **step)
    with pytest.raises(ArgumentError, match="`q` must be"):
        decode(q.double(), cache, **step)
    with pytest.raises(ArgumentError, match="`cache` must be"):
        decode(q, object(), **step)
    with pytest.raises(ArgumentError, match="`cache_seqlens` must be int32"):
        decode(q, cache, torch.tensor([3, 1], device=device), **step)
    with pytest.raises(ArgumentError, match="contiguous cache needs `max_seqlen`"):
        Cache(2, **pool)
    with pytest.raises(ArgumentError, match="-1 before a valid page"):
        Cache(2, num_pages=4, block_table=torch.tensor([[0, -1, 1], [2, 3, -1]], dtype=torch.int32, device=device),
              **pool)
    with pytest.raises(ArgumentError, match="page 1 is listed more than once"):
        Cache(2, num_pages=4, block_table=torch.tensor([[0, 1], [1, 2]], dtype=torch.int32, device=device), **pool)
    with pytest.raises(ArgumentError, match="`seqlens` must be 2 ints"):
        Cache(2, num_pages=4, device=device, **pool).prefill(seqlens=[3, 4], **tokens(2, 3)[0])
    # A sequence that is long enough: the step's own state passed explicitly gives the same bits as the defaults;
    # a narrower page table is refused.
    new, _ = tokens(2, 1)
    cache.append(**new)
    _, step = tokens(2, 1)
    q = step.pop("q")
    implicit = decode(q, cache, **step)
    explicit = decode(q, cache, cache.seqlens.clone(), cache.block_table.clone(), **step)
    assert torch.equal(implicit, explicit), "decode with the cache's own cache_seqlens/block_table passed explicitly"
    with pytest.raises(ArgumentError, match="`block_table` has 1 columns"):
        decode(q, cache, None, cache.block_table[:, :1].contiguous(), **step)
    # Explicit lengths past what the cache holds, a page outside the pool (issue 14: a segfault or NaN before):
    # raised at the call when the values are on the host; on a GPU the step clamps and flags them instead
    # (no sync), and check_errors() raises.
    bad_table = cache.block_table.clone()
    bad_table[1, 0] = 1000
    for args, name in (((torch.tensor([1000, 2], dtype=torch.int32, device=device), None), "cache_seqlens"),
                       ((None, bad_table), "block_table")):
        if torch.device(device).type == "cpu":
            with pytest.raises(ArgumentError, match=rf"{name}\[[0-9, ]+\] = 1000"):
                decode(q, cache, *args, **step)
        else:
            out = decode(q, cache, *args, **step)
            assert torch.isfinite(out).all(), f"{name}: the clamped step read outside the cache"
            with pytest.raises(ArgumentError, match=name):
                cache.check_errors()
    if torch.device(device).type != "cpu":  # clamped steps ran: the cache must decode to the same bits
        assert torch.equal(decode(q, cache, **step), implicit), "the cache changed after the flagged steps"


def check_decode_cuda_graph(module, spec: Spec, prompt_lens: list[int], *, q_len: int = 1, seed: int | None = None):
    """GPU: one decode step captured in a CUDA graph and replayed gives the eager step's output bit for bit, and a
    replay after appending a token (lengths live on the device) matches the eager step at the new length."""
    device = "cuda"
    B = len(prompt_lens)
    case = _decode_case(module, spec, prompt_lens, 2 * q_len, False, device, seed,
                        what="decode in a CUDA graph")
    inputs, off = case.inputs, case.offsets
    Cache, decode, _ = _cache_and_fns(module, spec)
    names = list(module.CACHE_TENSORS)
    pool = {k: inputs[k] for k in POOL_WEIGHTS if k in inputs}
    final = [p + 2 * q_len for p in prompt_lens]
    num_pages, table = shuffled_block_table(final, spec.decode.page_size, case.gen)
    cache = Cache(B, num_pages=num_pages, block_table=table.to(device), device=device, **pool)
    cache.prefill(seqlens=prompt_lens, **{n: inputs[n][:, :max(prompt_lens)] for n in names})
    lens = list(prompt_lens)
    cache.append(**{n: _rows(inputs[n], lens, q_len) for n in names})
    lens = [n + q_len for n in lens]
    step = {n: _rows(inputs[n], [n_ - q_len - o for n_, o in zip(lens, off)], q_len).clone()
            for n in PER_QUERY if n in inputs}
    q = step.pop("q")
    eager = decode(q, cache, **step)
    out = torch.empty_like(eager)
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        decode(q, cache, **step, out=out)
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        decode(q, cache, **step, out=out)
    out.fill_(float("nan"))
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(out, eager), f"graph replay differs from the eager step {case.where}"
    # Next step: append eagerly, refresh the step's inputs in place, replay the same graph.
    cache.append(**{n: _rows(inputs[n], lens, q_len) for n in names})
    lens = [n + q_len for n in lens]
    fresh = {n: _rows(inputs[n], [n_ - q_len - o for n_, o in zip(lens, off)], q_len)
             for n in PER_QUERY if n in inputs}
    q.copy_(fresh.pop("q"))
    for n, x in fresh.items():
        step[n].copy_(x)
    eager = decode(q, cache, **step)
    out.fill_(float("nan"))
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(out, eager), f"graph replay after an append differs from the eager step {case.where}"
