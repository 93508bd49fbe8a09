"""specgen.runtime pieces that generated modules share: the fp8 row quantiser, devices, the varlen check."""

import pytest
import torch

from specgen import runtime, testing
from specgen.reference.indexer import fp8_round_trip
from specgen.runtime.fp8 import _e4m3_code

import triton  # noqa: E402  (after specgen, which turns the CPU interpreter on without a GPU)
import triton.language as tl  # noqa: E402


def test_fp8_rows_scale_each_row_to_the_e4m3_range():
    gen = torch.Generator().manual_seed(0)
    x = (torch.randn(3, 5, 64, generator=gen) * torch.tensor([1e-3, 1.0, 300.0]).view(3, 1, 1)).to(torch.bfloat16)
    x[1, 2] = 0
    x8, scale = runtime.fp8_rows(x)
    assert x8.dtype == torch.float8_e4m3fn and x8.shape == x.shape
    assert scale.dtype == torch.float32 and scale.shape == x.shape[:-1]
    amax = x.float().abs().amax(-1)
    nonzero = amax > 0
    # The correctly rounded fp32 quotient, on every device (a product with 1/448 is an ulp off for many rows, and
    # an ulp moves elements across e4m3 ties: the kernels and the CPU reference would round differently).
    assert torch.equal(scale[nonzero], (amax[nonzero].double() / runtime.FP8_MAX).float())
    assert scale[1, 2] == 1 and bool((x8[1, 2].float() == 0).all())
    # The row's largest element lands on 448; every element within e4m3's half-ulp (2^-4 relative) or its
    # subnormal step.
    assert torch.allclose(x8.float().abs().amax(-1)[nonzero], torch.tensor(runtime.FP8_MAX))
    back = x8.float() * scale.unsqueeze(-1)
    err = (back - x.float()).abs()
    assert bool((err <= x.float().abs() * 2 ** -4 + scale.unsqueeze(-1) * 2 ** -10).all())


def test_reference_round_trip_is_the_kernels_quantiser():
    x = torch.randn(2, 7, 32, dtype=torch.float64)
    x8, scale = runtime.fp8_rows(x)
    assert torch.equal(fp8_round_trip(x), x8.double() * scale.double().unsqueeze(-1))


def test_fp8_rows_are_the_same_on_every_device():
    """The rows the GPU kernels see equal the CPU reference's bit for bit (runtime.fp8_rows on each device), on bf16
    rows whose quotients often sit exactly on e4m3 rounding ties."""
    gen = torch.Generator().manual_seed(1)
    # a decode step's q_I (the GPU's one-launch kernel, runtime.fp8) and a prefill chunk's (V3.2's 64 heads x 128)
    for shape in ((64, 2, 128), (2048, 64, 128)):
        x = torch.randn(shape, generator=gen).to(torch.bfloat16)
        w = torch.randn(shape[:-1], generator=gen).to(torch.bfloat16)
        cpu8, cpu_scale = runtime.fp8_rows(x)
        dev8, dev_scale = runtime.fp8_rows(x.to(testing.test_device()))
        assert torch.equal(dev_scale.cpu(), cpu_scale)
        assert torch.equal(dev8.cpu().view(torch.uint8), cpu8.view(torch.uint8))
        cpu_q, cpu_w = runtime.fp8_index_queries(x, w)
        dev_q, dev_w = runtime.fp8_index_queries(x.to(testing.test_device()), w.to(testing.test_device()))
        assert torch.equal(dev_w.cpu(), cpu_w) and torch.equal(dev_q.cpu().view(torch.uint8), cpu_q.view(torch.uint8))


def test_fp8_kernel_rounds_as_torch():
    """runtime.fp8's one-launch quantiser (GPU tensors take it) gives the torch form's bits: scales, e4m3 rows
    (ties, subnormals, zero rows, -0) and the folded head weights; its cast alone matches torch's on every class of
    fp32 value below 464 and NaN, and saturates from 464 up (inf included) to 448 with the sign, the rule
    runtime/fp8.py states. The torch form on the CPU, the kernel on the test device (the interpreter without a
    GPU)."""
    from specgen.runtime import fp8

    dev = testing.test_device()
    gen = torch.Generator().manual_seed(2)
    for dtype, D in ((torch.bfloat16, 128), (torch.float16, 96), (torch.float32, 64)):
        x = (torch.randn(37, 3, D, generator=gen) * torch.logspace(-3, 2, 37).view(37, 1, 1)).to(dtype)
        x[0, 0] = 0
        x[1, 1, :] = 2.0 ** -16      # beside an amax of 1: 2^-16 x 448 lies in e4m3's subnormals (below 2^-6)
        x[1, 1, 0] = 1.0
        x[2, 2, 3] = -0.0
        x[3, 0, 5] = float("nan")    # torch's row max keeps it: the row's scale is 1
        w = torch.randn(37, 3, generator=gen).to(dtype)
        want8, want_scale = runtime.fp8_rows(x)
        got8, got_scale = fp8.rows(x.to(dev))
        assert torch.equal(got_scale.cpu(), want_scale)
        assert torch.equal(got8.cpu().view(torch.uint8), want8.view(torch.uint8))
        want_q, want_w = runtime.fp8_index_queries(x, w)
        got_q, got_w = fp8.rows(x.to(dev), w.to(dev))
        assert torch.equal(got_w.cpu(), want_w) and torch.equal(got_q.cpu().view(torch.uint8), want_q.view(torch.uint8))
    with pytest.raises(ValueError, match="5 weights for 111 rows"):
        fp8.rows(x.to(dev), w[:5].to(dev))
    v = torch.cat([torch.randn(2000, generator=gen) * s for s in (1e-4, 1e-2, 1.0, 300.0)] + [torch.tensor(
        [448.0, 460.0, 464.0, 480.0, 1e4, float("inf"), -float("inf"), float("nan"), 0.0, -0.0, 2.0 ** -9,
         2.0 ** -10, 3 * 2.0 ** -10, 2.0 ** -6 * (1 - 2.0 ** -5)])])
    codes = torch.empty(v.numel(), dtype=torch.uint8, device=dev)
    _cast_kernel[(triton.cdiv(v.numel(), 1024),)](v.to(dev), codes, v.numel(), B=1024)
    # torch's own cast of |v| >= 464 (past 448 and its half step) differs between torch versions: the NaN code (0x7F
    # with the sign) in older ones (the H100's torch 2.11), 448 (0x7E) in 2.13. Those values are checked against the
    # kernel's stated rule, 0x7E with v's sign bit, whatever torch runs the test; every other value (NaN included)
    # against torch's cast, bit for bit.
    codes, big = codes.cpu(), v.abs() >= 464
    assert big.sum() > 5  # the listed 464, 480, 1e4, inf and -inf, and some of the randn * 300 of either sign
    assert torch.equal(codes[~big], v[~big].to(torch.float8_e4m3fn).view(torch.uint8))
    assert torch.equal(codes[big], torch.where(v[big] < 0, 0xFE, 0x7E).to(torch.uint8))


@triton.jit
def _cast_kernel(V, OUT, N, B: tl.constexpr):
    i = tl.program_id(0) * B + tl.arange(0, B)
    tl.store(OUT + i, _e4m3_code(tl.load(V + i, mask=i < N)).to(tl.uint8), mask=i < N)


def test_fp8_rows_chunks_change_nothing(monkeypatch):
    x = torch.randn(3, 100, 64).to(torch.bfloat16)
    whole = runtime.fp8_rows(x)
    monkeypatch.setattr(runtime, "FP8_CHUNK_ELEMENTS", 64 * 7)                       # 43 chunks, a ragged last one
    chunked = runtime.fp8_rows(x)
    assert torch.equal(whole[0].float(), chunked[0].float()) and torch.equal(whole[1], chunked[1])


def test_as_device_makes_the_index_explicit(monkeypatch):
    assert runtime.as_device("cpu") == torch.device("cpu")
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 3)
    assert runtime.as_device("cuda") == torch.device("cuda", 3)        # equal to a tensor's device there
    assert runtime.as_device(torch.device("cuda", 1)) == torch.device("cuda", 1)


def test_check_varlen_reads_a_cu_seqlens_once_until_it_changes(monkeypatch):
    cu = torch.tensor([0, 5, 5, 9], dtype=torch.int32)
    cpu = torch.device("cpu")
    first = runtime.check_varlen("f", cu, 5, 9, cpu, 64, "s")
    assert runtime.check_varlen("f", cu, 5, 9, cpu, 64, "s") is first            # same tensor: not read again
    assert runtime.check_varlen("f", cu, 6, 9, cpu, 64, "s") is not first        # another max_seqlen
    twin = cu.clone()
    assert runtime.check_varlen("f", twin, 5, 9, cpu, 64, "s") is not first      # another tensor: checked
    twin[1:3] = 7                                                                # in place: version changes
    with pytest.raises(runtime.ArgumentError, match="sequence 0 has 7 tokens"):
        runtime.check_varlen("f", twin, 5, 9, cpu, 64, "s")
    packed = runtime.check_varlen("f", twin, 7, 9, cpu, 64, "s")
    assert packed.positions().tolist() == [0, 1, 2, 3, 4, 5, 6, 0, 1]


def test_decode_splits_follow_the_plans_rule_from_the_sm_count(monkeypatch):
    monkeypatch.setattr(runtime, "_sm_count", lambda device: 132)
    cuda = torch.device("cuda", 0)
    # NSA paper at batch 1: 4 compression programs, 128 tiles of pooled keys at 128k: capped at 64.
    assert runtime.decode_splits(4, 128, cuda) == 64
    assert runtime.decode_splits(4, 128, cuda, waves=1, cap=32) == 32
    # Batch 64: 256 programs, two waves of 132 SMs need 2 splits; one wave needs 1; never more splits than tiles.
    assert runtime.decode_splits(256, 64, cuda) == 2
    assert runtime.decode_splits(256, 64, cuda, waves=1) == 1
    assert runtime.decode_splits(4, 3, cuda) == 3
    assert runtime.decode_splits(4, 128, "cpu", waves=1, cap=1) == 2  # the CPU tests always merge two splits
    # `resident` (the compression forms): one round of the programs an SM holds, each split whole tiles.
    assert runtime.decode_splits(256, 64, cuda, resident=2) == 1      # batch 64: 256 programs on 264 slots
    assert runtime.decode_splits(4, 128, cuda, resident=3) == 64      # batch 1: 99 splits of 128 tiles are 64 of 2
    assert runtime.decode_splits(4, 128, "cpu", resident=3) == 2
    assert runtime.splits_in_one_round(4, 130, 264, 64) == 44         # 64 splits of 130 tiles: 3 tiles, 44 non-empty
    assert runtime.splits_in_one_round(32, 64, 264, 64) == 8 and runtime.splits_in_one_round(1000, 64, 264, 64) == 1


def test_decode_combine_tiles_fill_the_gpu_at_batch_one(monkeypatch):
    monkeypatch.setattr(runtime, "_sm_count", lambda device: 132)
    cuda = torch.device("cuda", 0)
    # Batch 1 of the NSA paper configuration: 64 rows, 64 splits: the smallest tiles (256 programs, not 4).
    br, bd, sb, warps = runtime.decode_combine_tiles(64, 128, 64, cuda)
    assert (br, bd, sb, warps) == (2, 16, 8, 1)
    # DSA V3.2 at batch 1 (128 rows of 512 values) reaches two programs per SM before the smallest tiles.
    br, bd, sb, warps = runtime.decode_combine_tiles(128, 512, 64, cuda)
    assert (br, bd) == (2, 64) and (128 // br) * (512 // bd) >= 2 * 132
    # A higher cap on the splits a load (the descriptor's combine_sb): 64 splits in one round, tiles as before.
    assert runtime.decode_combine_tiles(64, 128, 64, cuda, 64) == (2, 16, 64, 2)
    assert runtime.decode_combine_tiles(64, 128, 20, cuda, 64)[2] == 32
    # Batch 64: the rows alone fill the GPU: 2-D tiles, one split at a time.
    assert runtime.decode_combine_tiles(64 * 64, 128, 2, cuda) == (16, 128, 1, 4)
    assert runtime.decode_combine_tiles(64 * 128, 512, 3, cuda) == (16, 128, 1, 4)
    # Off the GPU: two column tiles whenever DV > 16, so the interpreter runs the column masks; the 3-D path for
    # the default 2 splits, the 2-D path for more (the generated tests' num_splits=3 case).
    assert runtime.decode_combine_tiles(8, 48, 2, "cpu") == (16, 32, 2, 4)
    assert runtime.decode_combine_tiles(8, 16, 3, "cpu") == (16, 16, 1, 4)



# ---------------------------------------------------------------------------------------------------------------
# Hand-made selections: the value check of indices= (the call table is tests/test_call_errors.py)
# ---------------------------------------------------------------------------------------------------------------

def _selection(T=40, unit=16, k=4):
    """[1, T, 2, k] rows in the documented form: every visible block (at most k), ascending, -1 padding."""
    idx = torch.full((1, T, 2, k), -1, dtype=torch.int32)
    for t in range(T):
        blocks = list(range(t // unit + 1))[:k]
        idx[0, t, :, :len(blocks)] = torch.tensor(blocks, dtype=torch.int32)
    return idx


def test_check_indices_reads_a_tensor_once_until_it_changes():
    idx = _selection()
    shape = tuple(idx.shape)
    assert torch.equal(runtime.check_indices("f", idx, shape, idx.device, 16), idx)
    calls = []
    real = torch.Tensor.nonzero
    try:
        torch.Tensor.nonzero = lambda self, *a, **k: calls.append(1) or real(self, *a, **k)
        runtime.check_indices("f", idx, shape, idx.device, 16)                     # cached: no second pass
        idx[0, 39, 1, 1] = 0                                                        # edited in place: [0, 0, 2, -1]
        with pytest.raises(runtime.ArgumentError, match=r"indices\[0, 39, 1\].*lists block 0 twice"):
            runtime.check_indices("f", idx, shape, idx.device, 16)
    finally:
        torch.Tensor.nonzero = real
    assert calls == [1]                                                             # the error path only
    # A different shape (another T) is checked again: block 2 does not exist at T = 32.
    fresh = _selection()[:, :32].clone()
    fresh[0, 31, 0, 2] = 2
    with pytest.raises(runtime.ArgumentError, match=r"holds 2 at slot 2, outside \[0, 2\)"):
        runtime.check_indices("f", fresh, tuple(fresh.shape), fresh.device, 16)


def test_check_indices_allows_future_units_and_chunks_change_nothing(monkeypatch):
    idx = _selection()
    idx[0, 3, 0, :3] = torch.tensor([0, 1, 2], dtype=torch.int32)    # blocks after t = 3: allowed, they add nothing
    runtime.check_indices("f", idx, tuple(idx.shape), idx.device, 16)
    monkeypatch.setattr(runtime, "INDEX_CHECK_ELEMENTS", 12)          # 3 rows per chunk, a ragged last one
    bad = idx.clone()
    bad[0, 37, 1, 3] = 1
    with pytest.raises(runtime.ArgumentError, match=r"indices\[0, 37, 1\] .* is not ascending"):
        runtime.check_indices("f", bad, tuple(bad.shape), bad.device, 16)


def test_check_indices_values_skipped_where_the_host_cannot_read(monkeypatch):
    bad = _selection()
    bad[0, 5, 0, :2] = torch.tensor([-1, 0], dtype=torch.int32)
    monkeypatch.setenv("SPECGEN_CHECK_INDICES", "0")
    runtime.check_indices("f", bad, tuple(bad.shape), bad.device, 16)          # the opt-out: values unchecked
    monkeypatch.delenv("SPECGEN_CHECK_INDICES")
    monkeypatch.setattr(runtime, "_no_host_reads", lambda: True)               # torch.compile / graph capture
    runtime.check_indices("f", bad, tuple(bad.shape), bad.device, 16)
    with pytest.raises(runtime.ArgumentError, match="int32"):                  # shape and dtype still checked
        runtime.check_indices("f", bad.long(), tuple(bad.shape), bad.device, 16)
    monkeypatch.undo()
    with pytest.raises(runtime.ArgumentError, match="has -1 at slot 0 before block 0"):
        runtime.check_indices("f", bad, tuple(bad.shape), bad.device, 16)


def test_canonical_indices_gives_the_checked_form():
    rows = torch.tensor([[[3, -1, 1, 3, -1, 0]], [[-1, -1, -1, -1, -1, -1]], [[5, 4, 4, 4, 2, -7]]],
                        dtype=torch.int32)
    got = runtime.canonical_indices(rows)
    assert got.dtype == torch.int32
    assert got.tolist() == [[[0, 1, 3, -1, -1, -1]], [[-1] * 6], [[2, 4, 5, -1, -1, -1]]]
    as_selection = got.view(3, 6)[torch.arange(8) % 3].view(1, 8, 1, 6)      # T = 8 tokens: every entry in range
    runtime.check_indices("f", as_selection, (1, 8, 1, 6), got.device, 1)


# ---------------------------------------------------------------------------------------------------------------
# Without a GPU, as written: specgen turns Triton's interpreter on itself, or names what to set (fresh interpreters)
# ---------------------------------------------------------------------------------------------------------------

import os  # noqa: E402
import re  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
no_gpu = pytest.mark.skipif(torch.cuda.is_available(), reason="what a machine without a GPU does")


def _run_fresh(code: str, **env_changes) -> subprocess.CompletedProcess:
    """`code` in a fresh Python at the repository root, TRITON_INTERPRET unset unless given."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH")) if p)
    env.update(env_changes)
    return subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=600)


def _readme_cpu_training_snippet() -> str:
    blocks = re.findall(r"```python\n(.*?)```", (ROOT / "README.md").read_text(), flags=re.S)
    snippet = next(b for b in blocks if "NSAttention(64)" in b)
    assert "range(5)" in snippet and "TRITON_INTERPRET" not in snippet
    return snippet


@no_gpu
def test_readme_cpu_training_snippet_runs_as_written():
    """The README's CPU training snippet, without TRITON_INTERPRET set (one of its five steps: the interpreter
    takes seconds per step, and the first step is where it used to crash)."""
    snippet = _readme_cpu_training_snippet().replace("range(5)", "range(1)")
    result = _run_fresh(snippet + "\nassert torch.isfinite(loss).all()\nprint('trained', loss.item())\n")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "trained" in result.stdout


@no_gpu
@pytest.mark.parametrize("setup,words", [
    ("import triton", "triton was imported before specgen"),
    ("import os; os.environ['TRITON_INTERPRET'] = '0'", "TRITON_INTERPRET=0 turns"),
])
def test_without_the_interpreter_the_first_call_names_what_to_set(setup, words):
    """triton imported before specgen (its own helpers are then compiled-mode objects), or the interpreter
    turned off explicitly: the first call raises one line naming TRITON_INTERPRET=1, before any kernel runs."""
    code = f"""{setup}
import torch, specgen
from specgen.runtime import ArgumentError
nsa = specgen.load("specs/nsa_small.yaml")
x = torch.randn(1, 20, 64)
try:
    nsa.NSAttention(64)(x)
except ArgumentError as e:
    print("ERROR:", e)
"""
    result = _run_fresh(code)
    assert result.returncode == 0, result.stderr[-3000:]
    line = result.stdout.strip()
    assert line.startswith("ERROR: nsa_attention: no CUDA GPU here") and "\n" not in line, line
    assert words in line and "set TRITON_INTERPRET=1 in the environment" in line, line
