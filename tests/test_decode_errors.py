"""Decode hardening (issue 14): every mistake in a cache constructor or a decode call is an ArgumentError that
names the argument, raised before any kernel runs, leaving the cache as it was and usable; values that only the
device knows (explicit `cache_seqlens` / `block_table` on a GPU, or inside a CUDA graph) are clamped so no kernel
leaves its buffers, and raised from the cache's error flag by `cache.check_errors()`.

The tables are the contract: one row per mistake. The CPU rows run here under the interpreter; the `gpu` tests
repeat the device-side cases on CUDA (where the values cannot be read on the host) and inside a CUDA graph.
"""

import pytest
import torch

import specgen
from specgen import runtime
from specgen.reference import make_inputs
from specgen.runtime import ArgumentError
from specgen.model.spec import load_spec, replace
from specgen.testing import test_device

gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (kernels compiled, values on the device)")

SMALL = load_spec("specs/nsa_small.yaml")
SPECS = {
    "nsa_small": lambda: SMALL,
    "nsa_small_shared": lambda: replace(SMALL, name="nsa_small_err_shared", kv="shared"),
    "dsa_small": lambda: load_spec("specs/dsa_small.yaml"),
}
PER_QUERY = ("q", "gates", "q_idx", "w_idx")
CAP = 64  # tokens per sequence: a 64-token contiguous cache, one 64-token page per sequence when paged
PROMPTS = [20, 9]


class Ctx:
    """Two caches (contiguous, paged with a shuffled table) of one module, prefilled with PROMPTS and one appended
    token, plus the step's inputs and the outputs a correct step gives."""

    def __init__(self, name, device):
        self.spec = SPECS[name]()
        self.mod = specgen.load(self.spec)
        self.device = device
        mod, spec = self.mod, self.spec
        self.Cache = getattr(mod, f"{spec.family.upper()}Cache")
        self.decode = getattr(mod, f"{spec.family}_decode")
        gen = torch.Generator().manual_seed(1414)
        B, T = len(PROMPTS), max(PROMPTS) + 1
        x = make_inputs(spec, B, T, dtype=torch.float32, generator=gen)
        self.tokens = {n: x[n].to(device=device, dtype=mod.DTYPE) for n in mod.CACHE_TENSORS}
        self.step = {n: x[n][:, -1:].to(device=device, dtype=mod.DTYPE) for n in PER_QUERY if n in x}
        self.table = torch.tensor([[3, 1], [0, 4]], dtype=torch.int32, device=device)
        self.caches = {"contiguous": self.Cache(B, max_seqlen=CAP, device=device),
                       "paged": self.Cache(B, num_pages=5, block_table=self.table.clone(), device=device)}
        for cache in self.caches.values():
            cache.prefill(seqlens=PROMPTS, **{n: v[:, :T - 1] for n, v in self.tokens.items()})
            cache.append(**{n: _rows(v, PROMPTS) for n, v in self.tokens.items()})
        self.expected = {k: self.run(k) for k in self.caches}

    def run(self, layout, **kw):
        step = dict(self.step)
        q = step.pop("q")
        return self.decode(q, self.caches[layout], **step, **kw)

    def new_tokens(self, n=1, **changes):
        return {name: torch.randn(len(PROMPTS), n, *v.shape[2:], device=self.device).to(v.dtype)
                for name, v in self.tokens.items()} | changes


def _full(c):
    """A contiguous cache with one free row per sequence."""
    cache = c.Cache(2, max_seqlen=max(PROMPTS) + 1, device=c.device)
    return cache.prefill(**{n: v[:, :max(PROMPTS)] for n, v in c.tokens.items()})


def _rows(x, starts):
    return torch.stack([x[b, s:s + 1] for b, s in enumerate(starts)])


def _state(cache):
    tensors = {f"t.{k}": v for k, v in cache.tensors.items()}
    tensors.update({a: getattr(cache, a) for a in ("kc", "vc", "seqlens", "block_table", "error_flag")
                    if hasattr(cache, a)})
    return {k: v.clone() for k, v in tensors.items()}, list(cache.host_seqlens)


def _same(a, b):
    return a[1] == b[1] and a[0].keys() == b[0].keys() and all(
        torch.equal(a[0][k].view(torch.uint8) if a[0][k].dtype == torch.float8_e4m3fn else a[0][k],
                    b[0][k].view(torch.uint8) if b[0][k].dtype == torch.float8_e4m3fn else b[0][k]) for k in a[0])


@pytest.fixture(scope="module", params=["nsa_small"])
def ctx(request):
    return Ctx(request.param, test_device())


def _q(c, **changes):
    step = dict(c.step)
    return step.pop("q"), step


# Call-time mistakes: (id, layout, the call, words the ArgumentError must contain: the argument's name first).
# Rows in DEVICE_VALUED pass values that a GPU step cannot read without a sync: on the CPU they raise at the call;
# on a GPU the step runs clamped, and cache.check_errors() raises the same argument's name from the error flag.
DEVICE_VALUED = {"seqlens_1000_on_64_cache": "cache_seqlens", "seqlens_capacity_plus_1": "cache_seqlens",
                 "seqlens_past_tokens_held": "cache_seqlens", "seqlens_negative": "cache_seqlens",
                 "seqlens_shorter_than_q_len": "cache_seqlens", "q_len_past_tokens_held": "cache_seqlens",
                 "table_entry_outside_pool": "block_table", "table_entry_minus_1_within_length": "block_table"}
CALLS = [
    ("seqlens_1000_on_64_cache", "contiguous",
     lambda c: c.run("contiguous", cache_seqlens=torch.tensor([1000, 5], dtype=torch.int32, device=c.device)), ["cache_seqlens[0] = 1000"]),
    ("seqlens_capacity_plus_1", "contiguous",
     lambda c: c.run("contiguous", cache_seqlens=torch.tensor([21, CAP + 1], dtype=torch.int32, device=c.device)), ["cache_seqlens[1]"]),
    ("seqlens_past_tokens_held", "paged",
     lambda c: c.run("paged", cache_seqlens=torch.tensor([22, 10], dtype=torch.int32, device=c.device)), ["cache_seqlens[0] = 22"]),
    ("seqlens_negative", "paged",
     lambda c: c.run("paged", cache_seqlens=torch.tensor([-3, 10], dtype=torch.int32, device=c.device)), ["cache_seqlens[0] = -3"]),
    ("seqlens_shorter_than_q_len", "contiguous",
     lambda c: c.run("contiguous", cache_seqlens=torch.tensor([0, 10], dtype=torch.int32, device=c.device)), ["cache_seqlens[0] = 0"]),
    ("seqlens_int64", "contiguous",
     lambda c: c.run("contiguous", cache_seqlens=torch.tensor([21, 10], device=c.device)), ["`cache_seqlens` must be int32"]),
    ("seqlens_list", "contiguous", lambda c: c.run("contiguous", cache_seqlens=[21, 10]), ["`cache_seqlens`"]),
    ("seqlens_wrong_shape", "contiguous",
     lambda c: c.run("contiguous", cache_seqlens=torch.tensor([21], dtype=torch.int32, device=c.device)), ["`cache_seqlens`"]),
    ("seqlens_on_meta", "contiguous",
     lambda c: c.run("contiguous", cache_seqlens=torch.empty(2, dtype=torch.int32, device="meta")),
     ["`cache_seqlens` is on meta"]),
    ("table_entry_outside_pool", "paged",
     lambda c: c.run("paged", block_table=torch.tensor([[3, 1], [99, 4]], dtype=torch.int32, device=c.device)),
     ["block_table[1, 0] = 99", "pool of 5"]),
    ("table_entry_minus_1_within_length", "paged",
     lambda c: c.run("paged", block_table=torch.tensor([[-1, 1], [0, 4]], dtype=torch.int32, device=c.device)), ["block_table[0, 0] = -1"]),
    ("table_int64", "paged", lambda c: c.run("paged", block_table=torch.tensor([[3, 1], [0, 4]], device=c.device)), ["`block_table`"]),
    ("table_narrower", "paged",
     lambda c: c.run("paged", block_table=torch.tensor([[3], [0]], dtype=torch.int32, device=c.device)), ["`block_table` has 1 columns"]),
    ("table_for_contiguous_cache", "contiguous",
     lambda c: c.run("contiguous", block_table=torch.tensor([[3, 1], [0, 4]], dtype=torch.int32, device=c.device)), ["`block_table`"]),
    ("q_on_meta", "paged",
     lambda c: c.decode(_q(c)[0].to("meta"), c.caches["paged"], **_q(c)[1]), ["`q` is on meta", "the cache"]),
    ("gates_on_meta", "paged",
     lambda c: c.decode(_q(c)[0], c.caches["paged"], **(_q(c)[1] | {"gates": _q(c)[1]["gates"].to("meta")})),
     ["`gates` is on meta"]),
    ("q_batch_0", "paged", lambda c: c.decode(_q(c)[0][:0], c.caches["paged"], **_q(c)[1]), ["`q` has B=0"]),
    ("q_float64", "paged", lambda c: c.decode(_q(c)[0].double(), c.caches["paged"], **_q(c)[1]), ["`q` must be"]),
    ("q_wrong_heads", "paged", lambda c: c.decode(_q(c)[0][:, :, :1], c.caches["paged"], **_q(c)[1]), ["`q` must have"]),
    ("q_len_past_max", "paged",
     lambda c: c.decode(_q(c)[0].expand(-1, c.spec.decode.max_q_len + 1, -1, -1), c.caches["paged"], **_q(c)[1]),
     ["q_len=", "max_q_len"]),
    ("q_len_past_tokens_held", "paged",
     lambda c: c.decode(torch.cat([_q(c)[0]] * 10, 1)[:, :c.spec.decode.max_q_len], c.caches["paged"],
                        **{k: torch.cat([v] * 10, 1)[:, :c.spec.decode.max_q_len] for k, v in _q(c)[1].items()},
                        cache_seqlens=torch.tensor([21, 2], dtype=torch.int32, device=c.device)), ["cache_seqlens[1] = 2"]),
    ("gates_missing", "paged", lambda c: c.decode(_q(c)[0], c.caches["paged"]), ["`gates` is required"]),
    ("out_not_contiguous", "paged",
     lambda c: c.run("paged", out=torch.empty(2, 1, c.spec.heads.q, 2 * c.spec.head_dim.v, dtype=c.mod.DTYPE, device=c.device)[..., ::2]),
     ["`out`"]),
    ("out_wrong_dtype", "paged",
     lambda c: c.run("paged", out=torch.empty(2, 1, c.spec.heads.q, c.spec.head_dim.v, device=c.device)), ["`out`"]),
    ("num_splits_0", "paged", lambda c: c.run("paged", num_splits=0), ["`num_splits`"]),
    ("num_splits_negative", "paged", lambda c: c.run("paged", num_splits=-2), ["`num_splits`"]),
    ("num_splits_float", "paged", lambda c: c.run("paged", num_splits=2.5), ["`num_splits`"]),
    ("cache_not_a_cache", "paged", lambda c: c.decode(_q(c)[0], object(), **_q(c)[1]), ["`cache` must be"]),
    ("append_on_meta", "paged",
     lambda c: c.caches["paged"].append(**{n: v.to("meta") for n, v in c.new_tokens().items()}), ["is on meta"]),
    ("append_past_capacity", "contiguous", lambda c: _full(c).append(**c.new_tokens(2)), ["would hold"]),
    ("append_unknown_tensor", "paged",
     lambda c: c.caches["paged"].append(**c.new_tokens(), extra=torch.zeros(1)), ["unexpected arguments ['extra']"]),
    ("append_wrong_batch", "paged",
     lambda c: c.caches["paged"].append(**{n: v[:1] for n, v in c.new_tokens().items()}), ["must have shape"]),
    ("prefill_seqlens_past_T", "paged",
     lambda c: c.caches["paged"].prefill(seqlens=[30, 5], **c.new_tokens(20)), ["`seqlens` must be"]),
]


@pytest.mark.parametrize("row", CALLS, ids=[r[0] for r in CALLS])
def test_decode_call_mistakes_are_named_and_leave_the_cache_usable(ctx, row):
    name, layout, call, words = row
    cache = ctx.caches[layout]
    before = _state(cache)
    if name in DEVICE_VALUED and not ctx.device.startswith("cpu"):
        call(ctx)  # on the device: clamped and flagged, no sync, no exception
        words = [f"`{DEVICE_VALUED[name]}`"]
        with pytest.raises(ArgumentError) as e:
            cache.check_errors()
    else:
        with pytest.raises(ArgumentError) as e:
            call(ctx)
    for w in words:
        assert w in str(e.value), f"{name}: {w!r} not in: {e.value}"
    assert _same(before, _state(cache)), f"{name}: the cache changed"  # every buffer, bit for bit


def test_caches_give_the_same_bits_after_the_mistakes(ctx):
    """After the table's mistakes (run before this test in file order; on its own it checks a fresh cache), each
    cache still decodes, to the bits it gave before them (a decode per row would cost a minute on the CPU)."""
    for layout in ctx.caches:
        assert torch.equal(ctx.run(layout), ctx.expected[layout]), f"{layout}: the cache gives another output"


# Constructor mistakes (issue 14, section 5): (id, keyword arguments besides the batch, batch, argument named).
T32 = torch.int32
CONSTRUCTOR = [
    ("max_seqlen_float", 2, {"max_seqlen": 64.5}, "max_seqlen"),
    ("max_seqlen_float_whole", 2, {"max_seqlen": 64.0}, "max_seqlen"),
    ("max_seqlen_zero", 2, {"max_seqlen": 0}, "max_seqlen"),
    ("max_seqlen_negative", 2, {"max_seqlen": -5}, "max_seqlen"),
    ("max_seqlen_str", 2, {"max_seqlen": "64"}, "max_seqlen"),
    ("max_seqlen_bool", 2, {"max_seqlen": True}, "max_seqlen"),
    ("max_seqlen_tensor", 2, {"max_seqlen": torch.tensor(64)}, "max_seqlen"),
    ("max_seqlen_past_int32", 2, {"max_seqlen": 2**31}, "max_seqlen"),
    ("max_seqlen_missing", 2, {}, "max_seqlen"),
    ("batch_zero", 0, {"max_seqlen": 64}, "batch"),
    ("batch_negative", -1, {"max_seqlen": 64}, "batch"),
    ("batch_float", 2.0, {"max_seqlen": 64}, "batch"),
    ("batch_none", None, {"max_seqlen": 64}, "batch"),
    ("num_pages_float", 2, {"num_pages": 4.0}, "num_pages"),
    ("num_pages_zero", 2, {"num_pages": 0}, "num_pages"),
    ("num_pages_str", 2, {"num_pages": "4"}, "num_pages"),
    ("num_pages_too_few", 4, {"num_pages": 3}, "pages cannot hold"),
    ("both_layouts", 2, {"max_seqlen": 64, "num_pages": 4}, "max_seqlen"),
    ("table_without_num_pages", 2, {"block_table": torch.zeros(2, 1, dtype=T32)}, "block_table"),
    ("table_list", 2, {"num_pages": 4, "block_table": [[0, 1], [2, 3]]}, "block_table"),
    ("table_int64", 2, {"num_pages": 4, "block_table": torch.tensor([[0, 1], [2, 3]])}, "block_table"),
    ("table_rows", 2, {"num_pages": 4, "block_table": torch.tensor([[0, 1]], dtype=T32)}, "block_table"),
    ("table_no_columns", 2, {"num_pages": 4, "block_table": torch.zeros(2, 0, dtype=T32)}, "block_table"),
    ("table_outside_pool", 2, {"num_pages": 4, "block_table": torch.tensor([[0, 1], [2, 9]], dtype=T32)}, "block_table"),
    ("table_below_minus_1", 2, {"num_pages": 4, "block_table": torch.tensor([[0, 1], [2, -2]], dtype=T32)}, "block_table"),
    ("table_gap", 2, {"num_pages": 4, "block_table": torch.tensor([[0, -1, 1], [2, 3, -1]], dtype=T32)}, "block_table"),
    ("table_page_twice", 2, {"num_pages": 4, "block_table": torch.tensor([[0, 1], [1, 2]], dtype=T32)}, "more than once"),
    ("table_device_mismatch", 2, {"num_pages": 4, "device": "meta",
                                  "block_table": torch.tensor([[0, 1], [2, 3]], dtype=T32)}, "device"),
    ("device_bad_name", 2, {"max_seqlen": 64, "device": "gpu"}, "device"),
    ("device_float", 2, {"max_seqlen": 64, "device": 3.5}, "device"),
    ("device_meta", 2, {"max_seqlen": 64, "device": "meta"}, "device"),
    ("page_size_other", 2, {"num_pages": 4, "page_size": 16}, "page_size"),
    ("page_size_str", 2, {"num_pages": 4, "page_size": "64"}, "page_size"),
    ("dtype_other", 2, {"max_seqlen": 64, "dtype": torch.float64}, "dtype"),
    ("dtype_str", 2, {"max_seqlen": 64, "dtype": "float16"}, "dtype"),
]
if not torch.cuda.is_available():
    CONSTRUCTOR.append(("device_cuda_without_cuda", 2, {"max_seqlen": 64, "device": "cuda"}, "device"))


@pytest.mark.parametrize("row", CONSTRUCTOR, ids=[r[0] for r in CONSTRUCTOR])
def test_cache_constructor_mistakes_name_the_argument(row):
    name, batch, kw, words = row
    mod = specgen.load(SMALL)
    with pytest.raises(ArgumentError) as e:
        mod.NSACache(batch, **kw)
    assert words in str(e.value), f"{name}: {words!r} not in: {e.value}"


def test_cache_accepts_its_own_page_size_dtype_and_numpy_ints():
    np = pytest.importorskip("numpy")
    mod = specgen.load(SMALL)
    cache = mod.NSACache(np.int64(2), num_pages=np.int32(4), page_size=64, dtype=mod.DTYPE)
    assert cache.batch == 2 and cache.num_pages == 4 and cache.capacity == [128, 128]


# Values only the device knows: simulated on the CPU by declaring tensors unreadable on the host (what a CUDA
# tensor is to a step that must not synchronise); the step clamps, runs, and flags.
DEVICE_ROWS = [
    ("seqlens_1000", lambda c: {"cache_seqlens": torch.tensor([1000, 10], dtype=torch.int32, device=c.device)},
     "contiguous", "cache_seqlens"),
    ("seqlens_negative", lambda c: {"cache_seqlens": torch.tensor([21, -7], dtype=torch.int32, device=c.device)},
     "paged", "cache_seqlens"),
    ("table_outside_pool", lambda c: {"block_table": torch.tensor([[3, 1], [2**30, 4]], dtype=torch.int32,
                                                                  device=c.device)}, "paged", "block_table"),
    ("table_minus_1", lambda c: {"block_table": torch.tensor([[-1, 1], [0, 4]], dtype=torch.int32, device=c.device)},
     "paged", "block_table"),
]


def _device_case(c, row):
    name, make, layout, arg = row
    cache = c.caches[layout]
    out = c.run(layout, **make(c), return_indices=True)[0]  # no exception, no host read of the values
    assert torch.isfinite(out).all(), f"{name}: the clamped step read outside the sequences"
    assert int(cache.error_flag.item()) != 0, f"{name}: not flagged"
    with pytest.raises(ArgumentError, match=arg):
        cache.check_errors()
    assert int(cache.error_flag.item()) == 0, "check_errors clears the flag"
    runtime.raise_if_flagged(cache)  # nothing left
    assert torch.equal(c.run(layout), c.expected[layout]), f"{name}: the cache gives another output afterwards"


# Every row on a shared-K/V NSA spec; two on DSA (the guard is shared, the indexer path is what differs).
DEVICE_CASES = [("nsa_small_shared", r) for r in DEVICE_ROWS] + [("dsa_small", r) for r in DEVICE_ROWS
                                                                  if r[0] in ("seqlens_1000", "table_outside_pool")]


@pytest.mark.parametrize("spec_name,row", DEVICE_CASES, ids=[f"{n}-{r[0]}" for n, r in DEVICE_CASES])
def test_device_side_values_are_clamped_and_flagged(spec_name, row, monkeypatch):
    c = _ctx(spec_name)
    monkeypatch.setattr(runtime, "host_readable", lambda x: False)
    _device_case(c, row)


_ctxs = {}


def _ctx(name):
    if name not in _ctxs:
        _ctxs[name] = Ctx(name, test_device())
    return _ctxs[name]


def test_guards_directly():
    """The runtime guards on their own: host path raises, device path clamps and sets the bit, good values pass."""
    flag = torch.zeros(1, dtype=torch.int32)
    held = torch.tensor([10, 3], dtype=torch.int32)
    good = torch.tensor([10, 2], dtype=torch.int32)
    assert runtime.guard_cache_seqlens("f", good, 2, held, [10, 3], flag) is good
    with pytest.raises(ArgumentError, match=r"cache_seqlens\[1\] = 4"):
        runtime.guard_cache_seqlens("f", torch.tensor([10, 4], dtype=torch.int32), 2, held, [10, 3], flag)
    got = runtime.guard_cache_seqlens("f", torch.tensor([99, -1], dtype=torch.int32), 2, held, [10, 3], flag,
                                      host=False)
    assert got.tolist() == [10, 0] and got.dtype == torch.int32 and flag.item() == runtime.FLAG_SEQLENS
    table = torch.tensor([[0, 7, -1], [5, -1, -1]], dtype=torch.int32)
    flag.zero_()
    lens = torch.tensor([128, 64], dtype=torch.int32)
    assert runtime.guard_block_table("f", table, lens, 8, 64, flag) is table  # -1 past the lengths is fine
    with pytest.raises(ArgumentError, match=r"block_table\[0, 1\] = 7 is outside the pool of 6"):
        runtime.guard_block_table("f", table, lens, 6, 64, flag)
    got = runtime.guard_block_table("f", table, lens, 6, 64, flag, host=False)
    assert got.tolist() == [[0, 0, 0], [5, 0, 0]] and flag.item() == runtime.FLAG_BLOCK_TABLE


def test_editing_the_callers_table_after_construction_changes_nothing(ctx):
    table = torch.tensor([[3, 1], [0, 4]], dtype=torch.int32, device=ctx.device)
    cache = ctx.Cache(2, num_pages=5, block_table=table, device=ctx.device)
    cache.prefill(seqlens=PROMPTS, **{n: v[:, :max(PROMPTS)] for n, v in ctx.tokens.items()})
    cache.append(**{n: _rows(v, PROMPTS) for n, v in ctx.tokens.items()})
    table.fill_(1000)  # in place, after construction: pages far outside the pool
    q, step = _q(ctx)
    assert torch.equal(ctx.decode(q, cache, **step), ctx.expected["paged"])
    assert cache.block_table.tolist() == [[3, 1], [0, 4]]


def test_non_contiguous_inputs_are_accepted_and_give_the_same_bits(ctx):
    """Decision (docs/decode.md): any strides are accepted; a last dim without unit stride is copied."""
    q, step = _q(ctx)
    wide = torch.zeros(q.shape[0], q.shape[1], 2 * q.shape[2], q.shape[3], dtype=q.dtype, device=q.device)
    wide[:, :, ::2] = q
    q_heads_strided = wide[:, :, ::2]
    q_last_strided = q.transpose(-1, -2).contiguous().transpose(-1, -2)
    assert not q_heads_strided.is_contiguous() and q_last_strided.stride(-1) != 1
    gates = step["gates"].transpose(-1, -2).contiguous().transpose(-1, -2)
    for qq in (q_heads_strided, q_last_strided):
        assert torch.equal(ctx.decode(qq, ctx.caches["paged"], gates=gates), ctx.expected["paged"])
    lens = torch.tensor([21, 0, 10, 0], dtype=torch.int32, device=ctx.device)[::2]
    assert torch.equal(ctx.run("paged", cache_seqlens=lens), ctx.expected["paged"])


@pytest.mark.filterwarnings("ignore::RuntimeWarning")
def test_nan_in_one_sequence_stays_in_that_sequence():
    """Policy (docs/decode.md): no per-step NaN/Inf check. A NaN or Inf in q, k or v makes the outputs of the
    queries that attend to it non-finite; other sequences are untouched and selections stay in range."""
    c = _ctx("nsa_small_shared")
    cache = c.caches["paged"]
    q, step = _q(c)
    saved = cache.tensors["k"].clone()
    try:
        _nan_cases(c, cache, q, step)
    finally:
        cache.tensors["k"].copy_(saved)
    assert torch.equal(c.run("paged"), c.expected["paged"])


def _nan_cases(c, cache, q, step):
    for what in ("q", "k", "k_inf"):
        qq = q.clone()
        if what == "q":
            qq[0, 0, 0, 0] = float("nan")
        else:
            cache.tensors["k"][cache.block_table[0, 0], 3] = float("inf") if what == "k_inf" else float("nan")
        out, idx = c.decode(qq, cache, **step, return_indices=True)
        assert torch.equal(out[1], c.expected["paged"][1]), f"{what}: sequence 1 changed"
        assert not torch.isfinite(out[0]).all(), f"{what}: a non-finite input vanished"
        n_units = -(-(PROMPTS[0] + 1) // c.spec.selection.block)
        assert ((idx == -1) | ((idx >= 0) & (idx < n_units))).all(), f"{what}: selection out of range {idx}"


# On a GPU the values are on the device for real: no monkeypatch, and the same inside a CUDA graph.
@gpu
@pytest.mark.gpu
@pytest.mark.parametrize("spec_name", ["nsa_small", "nsa_small_shared", "dsa_small"])
@pytest.mark.parametrize("row", DEVICE_ROWS, ids=[r[0] for r in DEVICE_ROWS])
def test_device_side_values_are_clamped_and_flagged_on_the_gpu(row, spec_name):
    _device_case(_ctx(spec_name), row)


@gpu
@pytest.mark.gpu
@pytest.mark.parametrize("spec_name", ["nsa_small", "dsa_small"])
def test_out_of_range_values_inside_a_cuda_graph_are_flagged(spec_name):
    c = _ctx(spec_name)
    cache = c.caches["paged"]
    q, step = _q(c)
    lens = cache.seqlens.clone()
    table = cache.block_table.clone()
    out = torch.empty_like(c.expected["paged"])
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        c.decode(q, cache, lens, table, **step, out=out)
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        c.decode(q, cache, lens, table, **step, out=out)
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(out, c.expected["paged"]) and int(cache.error_flag.item()) == 0
    for bad_lens, bad_table, arg in (([100000, 10], None, "cache_seqlens"), (None, [[3, 1], [2**30, 4]], "block_table")):
        if bad_lens is not None:
            lens.copy_(torch.tensor(bad_lens, dtype=torch.int32))
        if bad_table is not None:
            table.copy_(torch.tensor(bad_table, dtype=torch.int32))
        graph.replay()
        torch.cuda.synchronize()  # no crash, no illegal address
        assert torch.isfinite(out).all()
        with pytest.raises(ArgumentError, match=arg):
            cache.check_errors()
        lens.copy_(cache.seqlens)
        table.copy_(cache.block_table)
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(out, c.expected["paged"]) and int(cache.error_flag.item()) == 0


def test_append_replayed_past_capacity_is_clamped_and_flagged(monkeypatch):
    """Inside a CUDA graph the host mirror cannot stop an append (a replay does not run Python): simulated by
    declaring host reads forbidden, appends past a sequence's capacity stay in its rows, its length stops at the
    capacity, and check_errors() names `append`."""
    c = _ctx("nsa_small")
    cache = _full(c)  # one free row per sequence
    monkeypatch.setattr(runtime, "no_host_reads", lambda: True)
    monkeypatch.setattr(cache, "host_seqlens", [0, 0])  # what a replayed graph's mirror would still say
    held = max(PROMPTS)
    before = {k: v[:, :held].clone() for k, v in cache.tensors.items() if v.shape[1] > held}  # the ring holds fewer
    assert before
    cache.append(**c.new_tokens(3))
    assert cache.seqlens.tolist() == cache.capacity == [held + 1] * 2
    with pytest.raises(ArgumentError, match="`append`"):
        cache.check_errors()
    # Sequence 0's overflow did not spill into sequence 1's rows (the next rows of a contiguous cache).
    assert all(torch.equal(v, cache.tensors[k][:, :held]) for k, v in before.items())


@gpu
@pytest.mark.gpu
def test_append_replayed_in_a_cuda_graph_past_capacity_is_flagged():
    c = _ctx("nsa_small")
    cache = _full(c)  # one free row per sequence
    new = c.new_tokens(1)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        cache.append(**new)  # captured, not run: the device lengths are still max(PROMPTS)
    for _ in range(3):
        graph.replay()
    torch.cuda.synchronize()  # no illegal address
    assert cache.seqlens.tolist() == [max(PROMPTS) + 1] * 2
    with pytest.raises(ArgumentError, match="`append`"):
        cache.check_errors()
