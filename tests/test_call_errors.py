"""A table of call-time mistakes on the small NSA and DSA specs: each raises ArgumentError naming the argument (no
other exception type) before any kernel runs, and leaves a given `out=` untouched.

Decode and cache arguments have their own table (specgen/testing/decode.py). Every check here raises before a
kernel launches, so the table costs no interpreter time: the committed modules are imported, never run.
"""

from pathlib import Path

import pytest
import torch

from specgen import runtime, testing
from specgen.runtime import ArgumentError

ROOT = Path(__file__).resolve().parent.parent
T = 20                       # nsa_small: 2 selection blocks of 16; dsa_small: 20 tokens, top-k 16
CU = [0, 12, 20]             # the packed cases: two sequences of 12 and 8 tokens


@pytest.fixture(autouse=True)
def _on_the_test_device():
    """Every tensor the table makes lives where the kernels run (CUDA on a GPU machine, else the CPU), so a row
    fails for the mistake it names, not for a device mismatch."""
    with torch.device(testing.test_device()):
        yield


def _module(name):
    return testing.load_generated(str(ROOT / "generated" / f"test_{name}.py"), name)


MODULES = {name: _module(name) for name in ("nsa_small", "dsa_small")}


def _valid_indices(spec, rows):
    """A hand-made selection in the documented form: unit 0 in every row, -1 padding."""
    idx = torch.full((*rows, spec.heads.kv, spec.selection.top_k), -1, dtype=torch.int32)
    idx[..., 0] = 0
    return idx


def _context(name):
    mod = MODULES[name]
    spec = testing.spec_of(mod)
    x = testing.inputs_for(mod, spec, 1, T, device=testing.test_device())
    indices = _valid_indices(spec, (1, T))
    return mod, spec, x, indices


# Bad values of a selection row: (what, row) with top_k slots; checked on the row of position 17, kv group 1.
def _bad_rows(k):
    pad = [-1] * (k - 2)
    return [
        ("duplicate", [0, 0] + pad, "twice"),
        ("leading -1", [-1, 0] + pad, "has -1 at slot 0 before"),
        ("out of range", [0, 1000] + pad, "holds 1000 at slot 1, outside"),
        ("2**31-1", [2**31 - 1, -1] + pad, "holds 2147483647 at slot 0, outside"),
        ("unsorted", [1, 0] + pad, "not ascending"),
        ("negative", [0, -5] + pad, "holds -5 at slot 1, outside"),
    ]


def _functions(name):
    mod = MODULES[name]
    family = "nsa" if name.startswith("nsa") else "dsa"
    fns = {"forward": getattr(mod, f"{family}_forward"), "attention": getattr(mod, f"{family}_attention")}
    if hasattr(mod, "distill_loss"):
        fns["distill_loss"] = mod.distill_loss
    return fns


def _call(name, which, x, **kwargs):
    fn = _functions(name)[which]
    if which == "distill_loss":
        kwargs.pop("out", None)
        return fn(x["q"], x["k"], x["q_idx"], x["k_idx"], x["w_idx"], **kwargs)
    return fn(**x, **kwargs)


def _cases():
    """(id, spec, entry point, mutate(x, indices) -> (inputs, kwargs), the argument the message must name)."""
    cases = []
    for name in MODULES:
        spec = testing.spec_of(MODULES[name])
        first_kv = "k_cmp" if name.startswith("nsa") else "k"
        for which in _functions(name):
            def add(what, mutate, arg, _which=which, _name=name):
                cases.append((f"{_name}-{_which}-{what}", _name, _which, mutate, arg))

            other = "k" if which == "distill_loss" else first_kv
            # Shapes, dtypes, devices, types.
            add("q-head-dim", lambda x, i: ({**x, "q": x["q"][..., :-1]}, {}), "q")
            add("q-3d", lambda x, i: ({**x, "q": x["q"][0]}, {}), "q")
            add(f"{other}-longer", lambda x, i, o=other: ({**x, o: torch.cat([x[o], x[o]], 1)}, {}), other)
            add("q-dtype", lambda x, i: ({**x, "q": x["q"].float()}, {}), "q")
            add(f"{other}-dtype", lambda x, i, o=other: ({**x, o: x[o].double()}, {}), other)
            add(f"{other}-device", lambda x, i, o=other: ({**x, o: x[o].to("meta")}, {}), other)
            add(f"{other}-list", lambda x, i, o=other: ({**x, o: x[o].tolist()}, {}), other)
            add("q-empty", lambda x, i: ({**x, "q": x["q"][:, :0]}, {}), "q")
            add("q-past-max_seqlen", lambda x, i, s=spec: (
                {**x, "q": x["q"][:, :1].expand(1, s.max_seqlen + 1, *x["q"].shape[2:])}, {}), "q")
            if name.startswith("nsa") and which != "distill_loss":
                add("gates-channels", lambda x, i: ({**x, "gates": x["gates"][..., :2]}, {}), "gates")
                add("gates-dtype", lambda x, i: ({**x, "gates": x["gates"].float()}, {}), "gates")
                add("gates-none", lambda x, i: ({**x, "gates": None}, {}), "gates")
            if name.startswith("dsa") and which != "distill_loss":
                add("q_idx-missing", lambda x, i: ({n: v for n, v in x.items() if n != "q_idx"}, {}), "q_idx")
            if which == "distill_loss":
                add("w_idx-heads", lambda x, i: ({**x, "w_idx": x["w_idx"][..., :1]}, {}), "w_idx")
                for stage in ("warmup", "Dense", "", 1):
                    add(f"stage-{stage!r}", lambda x, i, st=stage: (x, {"stage": st}), "stage")
                add("stage-dense-with-indices", lambda x, i: (x, {"stage": "dense", "indices": i}), "indices")
                add("lse_main-shape", lambda x, i: (x, {"lse_main": torch.zeros(1, T, 3)}), "lse_main")
            if which == "forward":
                add("out-shape", lambda x, i: (x, {"out": torch.empty(1, device=x["q"].device)}), "out")
                add("out-dtype", lambda x, i, s=spec: (x, {"out": torch.empty(
                    1, T, s.heads.q, s.head_dim.v, dtype=torch.float32)}), "out")
                add("out-non-contiguous", lambda x, i, s=spec: (x, {"out": torch.empty(
                    1, s.heads.q, T, s.head_dim.v, dtype=x["q"].dtype).transpose(1, 2)}), "out")
            # The selection: shape, dtype, device, then each bad value (section 4 of issue 14).
            add("indices-shape", lambda x, i: (x, {"indices": i[:, :, :1]}), "indices")
            add("indices-int64", lambda x, i: (x, {"indices": i.long()}), "indices")
            add("indices-device", lambda x, i: (x, {"indices": i.to("meta")}), "indices")
            add("indices-list", lambda x, i: (x, {"indices": i.tolist()}), "indices")
            for what, row, words in _bad_rows(spec.selection.top_k):
                def bad(x, i, r=row):
                    i = i.clone()
                    i[0, 17, 1] = torch.tensor(r, dtype=torch.int32)
                    return x, {"indices": i}
                add(f"indices-{what}", bad, ("indices", "indices[0, 17, 1]", words))
            # Packed batches: cu_seqlens and max_seqlen.
            def packed(change, arg, what):
                def mutate(x, i, change=change):
                    xp = {n: v[0] for n, v in x.items()}
                    kwargs = {"cu_seqlens": torch.tensor(CU, dtype=torch.int32), "max_seqlen": 12}
                    kwargs.update(change(i))
                    return xp, {k: v for k, v in kwargs.items() if v is not _DROP}
                add(f"packed-{what}", mutate, arg)

            packed(lambda i: {"cu_seqlens": torch.tensor(CU)}, "cu_seqlens", "int64")
            packed(lambda i: {"cu_seqlens": torch.tensor([1, 12, 20], dtype=torch.int32)}, "cu_seqlens", "start")
            packed(lambda i: {"cu_seqlens": torch.tensor([0, 12, 8, 20], dtype=torch.int32)}, "cu_seqlens",
                   "decreasing")
            packed(lambda i: {"cu_seqlens": torch.tensor([0, 12, 19], dtype=torch.int32)}, "cu_seqlens", "total")
            packed(lambda i: {"cu_seqlens": torch.tensor([CU], dtype=torch.int32)}, "cu_seqlens", "2d")
            packed(lambda i: {"cu_seqlens": torch.tensor(CU, dtype=torch.int32, device="meta")}, "cu_seqlens",
                   "device")
            packed(lambda i: {"cu_seqlens": _DROP}, "cu_seqlens", "max-without-cu")
            packed(lambda i: {"max_seqlen": _DROP}, "max_seqlen", "missing")
            packed(lambda i: {"max_seqlen": 11}, "max_seqlen", "too-small")
            packed(lambda i: {"max_seqlen": 12.0}, "max_seqlen", "float")
            packed(lambda i: {"max_seqlen": 0}, "max_seqlen", "zero")
            packed(lambda i: {"max_seqlen": spec.max_seqlen + 1}, "max_seqlen", "past-spec")

            def packed_bad_indices(x, i):
                i = i[0].clone()
                i[15, 1, :2] = torch.tensor([0, 0], dtype=torch.int32)     # sequence 1 has one block / 8 tokens
                return {n: v[0] for n, v in x.items()}, {
                    "cu_seqlens": torch.tensor(CU, dtype=torch.int32), "max_seqlen": 12, "indices": i}
            add("packed-indices-duplicate", packed_bad_indices, "indices")

            def packed_past_sequence(x, i):
                i = i[0].clone()
                i[19, 0, 1] = 1 if name.startswith("nsa") else 8             # past sequence 1 (8 tokens, 1 block)
                return {n: v[0] for n, v in x.items()}, {
                    "cu_seqlens": torch.tensor(CU, dtype=torch.int32), "max_seqlen": 12, "indices": i}
            add("packed-indices-past-its-sequence", packed_past_sequence, "indices")
    return cases


_DROP = object()
CASES = _cases()


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_call_mistake_raises_argument_error_naming_it(case):
    _, name, which, mutate, arg = case
    mod, spec, x, indices = _context(name)
    inputs, kwargs = mutate(x, indices)
    out = None
    if which == "forward" and "out" not in kwargs:
        rows = (inputs["q"].shape[0],) if "cu_seqlens" in kwargs and isinstance(inputs.get("q"), torch.Tensor) \
            and inputs["q"].dim() == 3 else (1, T)
        out = torch.full((*rows, spec.heads.q, spec.head_dim.v), float("nan"), dtype=mod.DTYPE)
        kwargs["out"] = out
    with pytest.raises(ArgumentError) as info:
        _call(name, which, inputs, **kwargs)
    assert type(info.value) is ArgumentError
    message = str(info.value)
    arg, *words = arg if isinstance(arg, tuple) else (arg,)
    assert f"`{arg}`" in message, f"the message does not name `{arg}`: {message}"
    for w in words:
        assert w in message, f"{w!r} not in: {message}"
    assert "\n" not in message, message
    if out is not None:
        assert torch.isnan(out).all(), f"`out` was written before the error: {message}"


@pytest.mark.parametrize("name", list(MODULES))
def test_the_layer_names_a_wrong_hidden_state(name):
    mod = MODULES[name]
    layer = getattr(mod, "NSAttention" if name.startswith("nsa") else "DSAttention")(64)
    cu = torch.tensor(CU, dtype=torch.int32)
    for hidden, kwargs in ((torch.randn(1, T, 32), {}), (torch.randn(T, 64), {}), ([[0.0] * 64], {}),
                           (torch.randn(1, T, 64), {"cu_seqlens": cu, "max_seqlen": 12})):
        with pytest.raises(ArgumentError, match="`hidden`"):
            layer(hidden, **kwargs)
    with pytest.raises(ArgumentError, match="`cu_seqlens`"):
        layer(torch.randn(T, 64), cu_seqlens=cu.long(), max_seqlen=12)


def test_strided_inputs_are_accepted_not_refused():
    """Non-contiguous inputs are taken: a unit last stride is used as it is (a slice of a fused projection), any
    other is copied once; only `out=` must be contiguous (it is written in place)."""
    fused = torch.randn(1, T, 3 * 2 * 48, dtype=torch.float16)
    k = fused[..., 96:192].unflatten(-1, (2, 48))
    assert not k.is_contiguous()
    assert runtime.check_tensor("f", "k", k, ("B", "T", 2, 48), torch.float16, {}) is k
    transposed = torch.randn(1, T, 48, 2, dtype=torch.float16).transpose(-1, -2)
    got = runtime.check_tensor("f", "k", transposed, ("B", "T", 2, 48), torch.float16, {})
    assert got.stride(-1) == 1 and torch.equal(got, transposed)


@pytest.mark.parametrize("name", list(MODULES))
def test_the_table_starts_from_valid_selections(name):
    """The rows above break one thing each: their starting selection passes the value check, batched and packed
    (so an `indices` row fails for the reason it names)."""
    spec = testing.spec_of(MODULES[name])
    unit, shape = spec.selection.block, (1, T, spec.heads.kv, spec.selection.top_k)
    indices = _valid_indices(spec, (1, T))
    indices[0, 17, 1, 1] = 1 if unit > 1 else 17                    # a second unit, ascending
    runtime.check_indices("f", indices, shape, indices.device, unit)
    cu = torch.tensor(CU, dtype=torch.int32)
    packed = runtime.check_varlen("f", cu, 12, T, cu.device, spec.max_seqlen, spec.name)
    runtime.check_indices("f", _valid_indices(spec, (T,)), shape[1:], indices.device, unit, packed)
