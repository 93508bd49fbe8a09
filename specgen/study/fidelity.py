"""How close a sparse variant comes to full attention: input regimes, recall, the needle task, and scorer fitting.

Everything here runs the float64 reference (`specgen.reference`), not the kernels: the kernels' selections equal the
reference's up to near-ties (the generated tests check that), and the reference runs anywhere, so fidelity is exact
and measured on the CPU. Shapes must stay small there (T <= ~2048, a few heads): dense attention is materialised.

Regimes (docs/sweeps.md has the details):

* ``random``      q, k, v ~ N(0, 1): no structure, dense attention is nearly uniform (the worst case for any selector).
* ``structured``  logits = sink + local (a RoPE-like positional kernel) + a few distant "hits" (short runs of keys on
                  a topic that a query looks for) + noise: the regime of docs/marks.md.
* ``retrieval``   the structured background without hits, plus needles: a needle key placed far back (in
                  [T/8, T/2)) that one later probe query (in [3T/4, T)) must find; every head of the probe's kv group
                  looks for it. Reports the needle hit rate.
* ``file:PATH``   captured q/k/v (and the hidden states an indexer reads) of a real model, per layer: a
                  safetensors or torch file (`specgen.study.capture_format`; `specgen capture` writes one).
                  ``file:PATH#layer=3`` names one layer.

Fitting (docs/marks.md: "fidelity comparisons between selectors need trained selectors"): an indexer's q/k/w come from
a tiny linear map of the main q and k, trained with the reference distillation loss (`reference.distill_loss`, the
dense warm-up stage) on a *train* split and evaluated on a separate *eval* split; a linear pool is fitted to the
dense attention output through the compression branch. Mean pooling and the compression scorer have no parameters.
"""

from __future__ import annotations

import math
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

from .. import reference
from ..reference._core import mask_from_indices, masked_attention, query_chunks, top_units
from ..reference.nsa import num_compressed_blocks, selection_unit

REGIMES = ("random", "structured", "retrieval")


# ---------------------------------------------------------------------------------------------------------------
# Input regimes
# ---------------------------------------------------------------------------------------------------------------

@dataclass
class Inputs:
    """Main-attention inputs of one split: q [B, T, Hq, Dqk], k [B, T, Hkv, Dqk], v [B, T, Hkv, Dv], and, for the
    retrieval regime, needles [N, 4] int64 rows (b, probe position t, kv group g, needle position s); a capture
    may add hidden [B, T, D_model], the attention module's input (what a real indexer is computed from), and meta."""
    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    needles: torch.Tensor | None = None
    hidden: torch.Tensor | None = None
    meta: dict = field(default_factory=dict)

    @property
    def shape(self) -> tuple[int, int]:
        return self.q.shape[0], self.q.shape[1]


def seed_of(*parts) -> int:
    """A stable seed from names and numbers (Python's hash() is salted per process)."""
    return zlib.crc32("/".join(map(str, parts)).encode()) & 0x7FFFFFFF


def shapes_of(spec) -> dict:
    return {"Hq": spec.heads.q, "Hkv": spec.heads.kv, "Dqk": spec.head_dim.qk, "Dv": spec.head_dim.v,
            "scale": spec.softmax_scale, "mla": spec.mla}


def _unit_rows(n: int, d: int, gen: torch.Generator, device) -> torch.Tensor:
    """n unit vectors in R^d, orthonormal when n <= d (else random, nearly orthogonal in high d)."""
    x = torch.randn(max(n, 1), d, generator=gen, dtype=torch.float64)
    if n <= d:
        x = torch.linalg.qr(x.T).Q.T[:n]
    return torch.nn.functional.normalize(x[:n], dim=-1).to(device)


def _uniform(shape, lo, hi, gen, device):
    return (lo + (hi - lo) * torch.rand(shape, generator=gen, dtype=torch.float64)).to(device)


def make_regime(regime: str, *, B: int, T: int, Hq: int, Hkv: int, Dqk: int, Dv: int, scale: float,
                mla: bool = False, seed: int = 0, model_seed: int = 0, n_needles: int = 16, device="cpu",
                dtype=torch.float64, base_dir: Path | None = None) -> Inputs:
    """Inputs of one regime (see the module docstring) with the given shapes; same seed, same tensors.

    The structure is built in "logit space": latent q and k whose dot products are the logits wanted, with the
    dimensions split into a positional block (2F dims, F frequencies), one sink dimension and a content block; each
    kv group then gets its own random rotation, and q is divided by the softmax scale so that scale * q.k equals the
    designed logits.

    `model_seed` draws what a trained model would fix (the rotations, each head's sink and local strength, the topic
    vocabulary); `seed` draws one sequence's content (which keys are hits, what each query looks for, needles, noise,
    values). Train and eval splits share the model and differ in content, so a scorer fitted on one can generalise.
    """
    if regime.startswith("file:"):
        return load_captured(regime[5:], base_dir=base_dir, device=device, dtype=dtype)
    if regime not in REGIMES:
        raise ValueError(f"unknown regime {regime!r}: use one of {', '.join(REGIMES)} or file:PATH")
    gen = torch.Generator().manual_seed(seed)
    model = torch.Generator().manual_seed(model_seed)
    G = Hq // Hkv
    if regime == "random":
        q = torch.randn(B, T, Hq, Dqk, generator=gen, dtype=torch.float64)
        k = torch.randn(B, T, Hkv, Dqk, generator=gen, dtype=torch.float64)
        v = torch.randn(B, T, Hkv, Dv, generator=gen, dtype=torch.float64)
        if mla:
            v = k[..., :Dv].clone()
        return Inputs(q.to(device, dtype), k.to(device, dtype), v.to(device, dtype))

    # Built in float64 for fidelity; in float32 when float32 or less is asked (speed inputs at long T).
    work = torch.float64 if dtype == torch.float64 else torch.float32
    F = max(1, Dqk // 4)                       # positional frequencies: 2F dims
    content = slice(2 * F + 1, Dqk)            # dims after the sink dim
    Dc = Dqk - 2 * F - 1
    qL = torch.zeros(B, T, Hkv, G, Dqk, dtype=work)
    kL = torch.zeros(B, T, Hkv, Dqk, dtype=work)

    # Local attention: sum_f a/F cos(w_f (t - s)), peaked at s = t, width ~ 1/w_max; per-head strength a.
    t = torch.arange(T, dtype=torch.float64)
    omega = torch.exp(torch.linspace(math.log(math.pi / 2), math.log(2 * math.pi / 256), F, dtype=torch.float64))
    phase = t[:, None] * omega[None, :]                                               # [T, F]
    rot = torch.cat([phase.cos(), phase.sin()], dim=-1)                               # [T, 2F]
    local = _uniform((1, 1, Hkv, G, 1), 3.0, 6.0, model, "cpu")
    qL[..., :2 * F] = local / F * rot[None, :, None, None, :]
    kL[..., :2 * F] = rot[None, :, None, :]
    # Sink: key 0 carries a unit on the sink dim; each head looks for it with its own strength.
    kL[:, 0, :, 2 * F] = 1.0
    qL[..., 2 * F] = _uniform((1, 1, Hkv, G), 3.0, 6.5, model, "cpu")

    needles = None
    if regime == "structured" and Dc > 0:
        # Distant hits: runs of 1-3 keys on one of M topics (about 2% of keys start a run); each (query, head) looks
        # for one topic (70% of them) with strength 4..7, so it finds a few earlier hits scattered over the past.
        M = 16
        topics = _unit_rows(M, Dc, model, "cpu")
        starts = torch.rand(B, T, Hkv, generator=gen) < 0.02
        run_len = torch.randint(1, 4, (B, T, Hkv), generator=gen)
        run_topic = torch.randint(0, M, (B, T, Hkv), generator=gen)
        for b, s, g in starts.nonzero().tolist():
            n = int(run_len[b, s, g])
            kL[b, s:s + n, g, content] += topics[int(run_topic[b, s, g])]
        q_topic = torch.randint(0, M, (B, T, Hkv, G), generator=gen)
        strength = _uniform((B, T, Hkv, G), 4.0, 7.0, gen, "cpu")
        strength = strength * (torch.rand(B, T, Hkv, G, generator=gen) < 0.7)
        qL[..., content] += strength[..., None] * topics[q_topic]
    elif regime == "retrieval":
        if Dc <= 0:
            raise ValueError(f"head_dim.qk {Dqk} leaves no content dims for needles")
        lo, hi, probe_lo = T // 8, T // 2, (3 * T) // 4
        n = min(n_needles, hi - lo, T - probe_lo)
        if n < 1:
            raise ValueError(f"T={T} is too short for the retrieval regime")
        rows = []
        for b in range(B):
            for g in range(Hkv):
                s = lo + torch.randperm(hi - lo, generator=gen)[:n]
                tp = probe_lo + torch.randperm(T - probe_lo, generator=gen)[:n]
                dirs = _unit_rows(n, Dc, gen, "cpu")
                kL[b, s, g, content] += dirs
                amp = _uniform((n, G), 6.0, 9.0, gen, "cpu")
                qL[b, tp, g, :, content] += amp[..., None] * dirs[:, None, :]
                rows += [[b, int(tp_), g, int(s_)] for tp_, s_ in zip(tp, s)]
        needles = torch.tensor(rows, dtype=torch.int64)

    # Noise on every dim: q.k noise of std ~0.5 logits.
    sigma = (0.25 / Dqk) ** 0.25
    qL += sigma * torch.randn(qL.shape, generator=gen, dtype=work)
    kL += sigma * torch.randn(kL.shape, generator=gen, dtype=work)
    R = torch.stack([torch.linalg.qr(torch.randn(Dqk, Dqk, generator=model, dtype=torch.float64)).Q
                     for _ in range(Hkv)]).to(work)                                   # [Hkv, D, D]
    q = torch.einsum("btgzd,gde->btgze", qL, R).reshape(B, T, Hq, Dqk) / scale
    k = torch.einsum("btgd,gde->btge", kL, R)
    v = torch.randn(B, T, Hkv, Dv, generator=gen, dtype=work)
    if mla:
        v = k[..., :Dv].clone()
    return Inputs(q.to(device, dtype), k.to(device, dtype), v.to(device, dtype),
                  None if needles is None else needles.to(device))


def load_captured(path: str | Path, *, base_dir: Path | None = None, device="cpu", dtype=torch.float64,
                  layer: int | None = None) -> Inputs:
    """Captured activations of a real model (`specgen.study.capture_format`: safetensors or torch, per layer); `path` may
    carry `#layer=N`. [T, H, D] tensors are read as one sequence."""
    from . import capture_format

    name, frag_layer = capture_format.parse_regime(str(path))
    c = capture_format.load(name, frag_layer if layer is None else layer, base_dir)
    return Inputs(c.q.to(device, dtype), c.k.to(device, dtype), c.v.to(device, dtype),
                  None if c.needles is None else c.needles.to(device=device),
                  None if c.hidden is None else c.hidden.to(device, dtype), c.meta)


def check_shapes(spec, inputs: Inputs) -> None:
    B, T, Hq, Dqk = inputs.q.shape
    want = (spec.heads.q, spec.heads.kv, spec.head_dim.qk, spec.head_dim.v)
    have = (Hq, inputs.k.shape[2], Dqk, inputs.v.shape[3])
    if want != have:
        raise ValueError(f"inputs have (Hq, Hkv, Dqk, Dv) = {have}, spec {spec.name} needs {want}")
    if T > spec.max_seqlen:
        raise ValueError(f"T={T} exceeds the spec's max_seqlen {spec.max_seqlen}")
    scale = inputs.meta.get("scale") if inputs.meta else None
    if isinstance(scale, (int, float)) and abs(scale - spec.softmax_scale) > 1e-6 * abs(scale):
        # Dense attention here uses the spec's scale: with another one it is not the model's attention.
        raise ValueError(f"the capture's softmax scale is {scale:.6g} but spec {spec.name} uses "
                         f"{spec.softmax_scale:.6g}; fix: set `scale: {scale:.9g}` in the sweep's `set`")


TrainSource = Callable[[int], Inputs]


def _windows(train: Inputs, T: int | None, n: int, seed: int) -> TrainSource:
    """Training batches cut from a fixed split: batch i is n windows of T tokens at positions drawn from (seed, i)."""
    B, full = train.shape
    if not T or T >= full:
        return lambda i: train

    def draw(i: int) -> Inputs:
        g = torch.Generator().manual_seed(seed_of("windows", seed, i))
        rows = torch.randint(0, B, (n,), generator=g).tolist()
        starts = torch.randint(0, full - T + 1, (n,), generator=g).tolist()

        def cut(t):
            return None if t is None else torch.stack([t[b, s:s + T] for b, s in zip(rows, starts)])

        return Inputs(cut(train.q), cut(train.k), cut(train.v), hidden=cut(train.hidden))

    return draw


def splits(spec, regime: str, T: int, *, batch: int, train_batch: int, n_needles: int = 16, device="cpu",
           base_dir: Path | None = None, train_T: int | None = None, seed: int = 0) -> tuple[TrainSource, Inputs]:
    """(train, eval) for a regime. eval: one draw (seed from the regime name, T, the shapes and `seed`: the same
    tensors for every variant of equal shapes and equal `seed`). train: `draw(i)` gives the i-th training batch, a
    fresh draw of the same "model" with its own content seed (never an eval seed), so fitting sees new sequences
    instead of memorising one batch. Repeats (`seed` 1, 2, ...) draw new eval and train content of the same model.

    A captured file has no generator: its first half (by batch, or of the sequence when B = 1) is the training data
    and the rest is evaluated. Training batch i is `train_batch` windows of `train_T` tokens cut from the training
    data at positions drawn from (seed, i): fitting sees many contexts at a cost set by train_T, not by the
    capture's length (the whole training split when train_T is None or not shorter)."""
    if regime.startswith("file:"):
        data = make_regime(regime, B=0, T=0, Hq=0, Hkv=0, Dqk=0, Dv=0, scale=1.0, device=device, base_dir=base_dir)
        B = data.q.shape[0]
        hid = data.hidden
        if B >= 2:
            h = B // 2
            fixed = Inputs(data.q[:h], data.k[:h], data.v[:h], hidden=None if hid is None else hid[:h])
            needles = None
            if data.needles is not None:
                kept = data.needles[data.needles[:, 0] >= h]
                needles = torch.cat([kept[:, :1] - h, kept[:, 1:]], dim=1)
            return _windows(fixed, train_T, train_batch, seed), Inputs(data.q[h:], data.k[h:], data.v[h:], needles,
                                                                       None if hid is None else hid[h:], data.meta)
        half = data.q.shape[1] // 2
        fixed = Inputs(data.q[:, :half], data.k[:, :half], data.v[:, :half],
                       hidden=None if hid is None else hid[:, :half])
        return _windows(fixed, train_T, train_batch, seed), data
    sh = shapes_of(spec)
    common = dict(n_needles=n_needles, device=device, model_seed=seed_of(regime, "model", *sh.values()), **sh)
    rep = () if seed == 0 else (f"repeat{seed}",)            # repeat 0 keeps the draws of a one-seed sweep
    evaluation = make_regime(regime, B=batch, T=T, seed=seed_of(regime, T, "eval", *rep, *sh.values()), **common)
    tT = min(T, train_T or T)

    def draw(i: int) -> Inputs:
        return make_regime(regime, B=train_batch, T=tT, seed=seed_of(regime, tT, "train", *rep, i, *sh.values()),
                           **common)

    return draw, evaluation


# ---------------------------------------------------------------------------------------------------------------
# Dense attention and the variant's inputs
# ---------------------------------------------------------------------------------------------------------------

@dataclass
class Dense:
    out: torch.Tensor       # [B, T, Hq, Dv] dense causal attention
    mass: torch.Tensor      # [B, T, Hkv, T] each query's dense softmax, averaged over the group's heads


def dense_attention(spec, x: Inputs, query_chunk: int = 256) -> Dense:
    B, T, Hq, _ = x.q.shape
    Hkv = x.k.shape[2]
    outs, masses = [], []
    pos = torch.arange(T, device=x.q.device)
    for rows in query_chunks(T, query_chunk):
        causal = pos[None, :] <= pos[rows][:, None]
        o, _, p = masked_attention(x.q[:, rows], x.k, x.v, causal[None, :, None, :], spec.softmax_scale)
        outs.append(o)
        masses.append(p.reshape(B, p.shape[1], Hkv, Hq // Hkv, T).mean(dim=3))
    return Dense(torch.cat(outs, 1), torch.cat(masses, 1))


def variant_inputs(spec, x: Inputs, fitted: "Fitted | None" = None) -> dict:
    """Keyword inputs of `reference.nsa_forward` (and of the generated forward) for a variant: every branch reads
    the same k/v (so "dense attention on the same inputs" is defined), gates are ones (the report mixes the branch
    outputs itself), and learned inputs come from `fitted` (an indexer map, linear pool weights)."""
    B, T = x.shape
    out = {"q": x.q}
    for name in reference.input_names(spec):
        if name == "q":
            continue
        if name in ("k", "k_cmp", "k_slc", "k_win"):
            out[name] = x.k
        elif name in ("v", "v_cmp", "v_slc", "v_win"):
            out[name] = x.v
        elif name == "gates":
            out[name] = x.q.new_ones(B, T, spec.heads.q, len(spec.branches))
    if spec.selection is not None and spec.selection.scorer == "indexer":
        if fitted is None or fitted.indexer is None:
            raise ValueError(f"{spec.name}: the indexer scorer needs indexer weights (fit_indexer or init_indexer)")
        with torch.no_grad():                        # inputs of the variant, not of the fitting graph
            out.update(fitted.indexer.inputs(x.q, x.k, x.hidden))
    if spec.needs_compressed_kv and spec.compression.pool == "linear":
        pool = fitted.pool if fitted is not None and fitted.pool is not None else mean_pool_init(spec, x.q)
        out.update({n: t.to(x.q) for n, t in pool.items()})
    return out


# ---------------------------------------------------------------------------------------------------------------
# Learnable scorers: the indexer map and the linear pool
# ---------------------------------------------------------------------------------------------------------------

class IndexerMap(torch.nn.Module):
    """q_idx, k_idx, w_idx as a tiny linear map of the main attention's q and k (shared by the kv groups):

        q_idx[t, g, j] = Wq[j] . concat_{h in g} q~[t, h]      (G*Dqk -> d_I per indexer head j)
        k_idx[s, g]    = Wk . k~[s, g]                         (Dqk -> d_I)
        w_idx[t, g, j] = Ww[:, j] . concat_{h in g} q~[t, h] + bw[j]

    with q~ = q * sqrt(scale), k~ = k * sqrt(scale) (so q~.k~ are the main logits). Randomly initialised it is
    "an indexer with random weights"; fitted, a stand-in for a trained one.

    With `hidden_dim` (a capture holding the attention module's input h [B, T, D_model]) the map reads h instead,
    as DSA's indexer does, with its own weights per kv group (h is the same for every group):
    q_idx[t, g, j] = Wq[g, j] . h[t], k_idx[s, g] = Wk[g] . h[s], w_idx[t, g, j] = Ww[g, :, j] . h[t] + bw[j].
    """

    def __init__(self, spec, seed: int = 0, hidden_dim: int | None = None):
        super().__init__()
        G, D = spec.heads.q // spec.heads.kv, spec.head_dim.qk
        H_I, d_I, Hkv = spec.indexer.heads, spec.indexer.head_dim, spec.heads.kv
        gen = torch.Generator().manual_seed(seed)
        self.spec = spec
        self.hidden_dim = hidden_dim
        if hidden_dim:
            M = hidden_dim
            self.Wq = torch.nn.Parameter(torch.randn(Hkv, H_I, M, d_I, generator=gen) * M ** -0.5)
            self.Wk = torch.nn.Parameter(torch.randn(Hkv, M, d_I, generator=gen) * M ** -0.5)
            self.Ww = torch.nn.Parameter(torch.randn(Hkv, M, H_I, generator=gen) * M ** -0.5 * 0.1)
        else:
            self.Wq = torch.nn.Parameter(torch.randn(H_I, G * D, d_I, generator=gen) * (G * D) ** -0.5)
            self.Wk = torch.nn.Parameter(torch.randn(D, d_I, generator=gen) * D ** -0.5)
            self.Ww = torch.nn.Parameter(torch.randn(G * D, H_I, generator=gen) * (G * D) ** -0.5 * 0.1)
        self.bw = torch.nn.Parameter(torch.ones(H_I))

    def inputs(self, q: torch.Tensor, k: torch.Tensor, hidden: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        spec = self.spec
        B, T, Hq, D = q.shape
        Hkv, H_I = spec.heads.kv, spec.indexer.heads
        s = math.sqrt(spec.softmax_scale)
        dt = self.Wq.dtype
        if self.hidden_dim:
            if hidden is None:
                raise ValueError("this indexer map reads hidden states; the inputs have none")
            h = hidden.to(dt)
            q_idx = torch.einsum("btm,gjme->btgje", h, self.Wq).reshape(B, T, Hkv * H_I, -1)
            k_idx = torch.einsum("btm,gme->btge", h, self.Wk)
            w_idx = (torch.einsum("btm,gmj->btgj", h, self.Ww) + self.bw).reshape(B, T, Hkv * H_I)
            return {"q_idx": q_idx.to(q.dtype), "k_idx": k_idx.to(q.dtype), "w_idx": w_idx.to(q.dtype)}
        qg = (q.to(dt) * s).reshape(B, T, Hkv, Hq // Hkv * D)
        q_idx = torch.einsum("btgf,jfe->btgje", qg, self.Wq).reshape(B, T, Hkv * H_I, -1)
        k_idx = torch.einsum("btgd,de->btge", k.to(dt) * s, self.Wk)
        w_idx = (torch.einsum("btgf,fj->btgj", qg, self.Ww) + self.bw).reshape(B, T, Hkv * H_I)
        return {"q_idx": q_idx.to(q.dtype), "k_idx": k_idx.to(q.dtype), "w_idx": w_idx.to(q.dtype)}


@dataclass
class Fitted:
    indexer: IndexerMap | None = None
    pool: dict[str, torch.Tensor] | None = None
    log: dict = field(default_factory=dict)      # what was fitted and how, for the report


def mean_pool_init(spec, like: torch.Tensor) -> dict[str, torch.Tensor]:
    """Linear pool weights equal to mean pooling: W[g] = [I/l; ...; I/l] ([l*D, D]), zero position embeddings."""
    l, Hkv = spec.compression.block, spec.heads.kv
    out = {}
    for name, D in (("k", spec.head_dim.qk), ("v", spec.head_dim.v)):
        eye = torch.eye(D, dtype=torch.float64) / l
        out[f"w_pool_{name}"] = eye.repeat(l, 1)[None].repeat(Hkv, 1, 1).to(like.device)
        if spec.compression.position_embedding:
            out[f"pe_pool_{name}"] = torch.zeros(l, D, dtype=torch.float64, device=like.device)
    return out


def _distill_eval(spec, x: Inputs, m: IndexerMap) -> float:
    with torch.no_grad():
        idx = {n: t.to(torch.float64) for n, t in m.inputs(x.q, x.k, x.hidden).items()}
        return float(reference.distill_loss(spec, x.q.to(torch.float64), x.k.to(torch.float64), **idx,
                                            query_chunk=256))


def _index_logits(spec, m: IndexerMap, q: torch.Tensor, k: torch.Tensor, bias: torch.Tensor,
                  hidden: torch.Tensor | None = None) -> torch.Tensor:
    """Index scores I [B, Hkv, T, T] of `reference.indexer_scores` (transposed to group-major for fast matmuls), plus
    `bias` (0 / -inf causal); used by the fitting loop only."""
    idx = m.inputs(q, k, hidden)
    B, T = q.shape[:2]
    Hkv, H_I = spec.heads.kv, spec.indexer.heads
    qi = idx["q_idx"].reshape(B, T, Hkv, H_I, -1).permute(0, 2, 1, 3, 4).reshape(B, Hkv, T * H_I, -1)
    ki = idx["k_idx"].permute(0, 2, 3, 1)                                             # [B, Hkv, d_I, T]
    w = idx["w_idx"].reshape(B, T, Hkv, H_I).permute(0, 2, 1, 3)[..., None]          # [B, Hkv, T, H_I, 1]
    dots = torch.relu(torch.matmul(qi, ki)).reshape(B, Hkv, T, H_I, T)
    return reference.indexer_scale(spec) * (dots * w).sum(3) + bias


def _target_kl(spec, m: IndexerMap, q, k, target, bias, entropy, hidden=None) -> torch.Tensor:
    """The dense-stage distillation loss with a precomputed target p [B, Hkv, T, T]: the mean over rows of
    sum_s p (log p - log_softmax(I)), equal to `reference.distill_loss(..., indices=None)` (a test checks it)
    without recomputing the detached target every step."""
    log_q = torch.log_softmax(_index_logits(spec, m, q, k, bias, hidden), dim=-1)
    return entropy - (target * torch.nan_to_num(log_q, neginf=0.0)).sum(-1).mean()


def fit_indexer(spec, train: TrainSource | Inputs, evaluation: Inputs | None = None, *, steps: int = 300,
                lr: float = 1e-2, seed: int = 0, refresh: int = 5) -> tuple[IndexerMap, IndexerMap, dict]:
    """(random-init map, fitted map, log): Adam on the distillation loss (dense stage: the target is the mean over
    the group's heads of the dense causal attention, `reference.distill_target`, precomputed per batch) in float32,
    over training batches `train(i)` (a new batch every `refresh` steps; a fixed Inputs is used throughout). The log
    has the loss before and after fitting on the eval split, computed by `reference.distill_loss` in float64."""
    source = (lambda i: train) if isinstance(train, Inputs) else train
    first = source(0)
    hidden_dim = first.hidden.shape[-1] if first.hidden is not None else None
    init = IndexerMap(spec, seed, hidden_dim)
    m = IndexerMap(spec, seed, hidden_dim)
    opt = torch.optim.Adam(m.parameters(), lr=lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, max(steps, 1))
    losses, batches, shape = [], 0, None
    for step in range(steps):
        if step % refresh == 0:
            x = first if step == 0 else source(step // refresh)
            batches += 1
            q, k = x.q.float(), x.k.float()
            hid = None if x.hidden is None else x.hidden.float()
            m = m.to(q.device)
            T = q.shape[1]
            shape = (q.shape[0], T)
            target = reference.distill_target(spec, q, k).transpose(1, 2).contiguous()   # [B, Hkv, T, T]
            pos = torch.arange(T, device=q.device)
            bias = torch.zeros(T, T, device=q.device).masked_fill(pos[None, :] > pos[:, None], float("-inf"))
            logp = torch.log(torch.where(target > 0, target, torch.ones_like(target)))
            entropy = float((target * logp).sum(-1).mean())
        opt.zero_grad()
        loss = _target_kl(spec, m, q, k, target, bias, entropy, hid)
        loss.backward()
        opt.step()
        sched.step()
        losses.append(float(loss.detach()))
    fresh = batches > 1 and not isinstance(train, Inputs)
    log = {"what": "indexer",
           "how": f"Adam lr {lr} (cosine), {steps} steps on the dense-stage distillation loss (KL to the group-mean "
                  f"dense attention), float32, train batches of B={shape[0] if shape else 0} "
                  f"T={shape[1] if shape else 0}"
                  f" ({f'{batches} fresh draws, a new one every {refresh} steps' if fresh else 'one fixed batch'}); "
                  + ("q_idx/k_idx/w_idx a linear map of the captured hidden states (per kv group)" if hidden_dim
                     else "q_idx/k_idx/w_idx a linear map of the main q, k"),
           "train_loss_first": losses[0] if losses else None, "train_loss_last": losses[-1] if losses else None}
    if evaluation is not None:
        m64 = IndexerMap(spec, seed, hidden_dim).to(device=evaluation.q.device, dtype=torch.float64)
        m64.load_state_dict({n: t.to(torch.float64) for n, t in m.state_dict().items()})
        i64 = IndexerMap(spec, seed, hidden_dim).to(device=evaluation.q.device, dtype=torch.float64)
        log["eval_loss_unfitted"] = _distill_eval(spec, evaluation, i64)
        log["eval_loss_fitted"] = _distill_eval(spec, evaluation, m64)
        m, init = m64, i64
    return init, m, log


def _pool_loss(spec, x: Inputs, params: dict, target: torch.Tensor | None = None) -> torch.Tensor:
    """Relative MSE of the compression branch's output (with these pool weights) against dense causal attention."""
    target = dense_attention(spec, x).out if target is None else target
    kc = reference.pool_kv(spec, x.k, params["w_pool_k"], params.get("pe_pool_k"))
    vc = reference.pool_kv(spec, x.v, params["w_pool_v"], params.get("pe_pool_v"))
    o, _, _ = reference.compression_attention(spec, x.q, kc, vc, x.q.shape[1])
    return ((o - target) ** 2).mean() / (target ** 2).mean()


def random_pool(spec, like: torch.Tensor, seed: int = 0) -> dict[str, torch.Tensor]:
    """Linear pool weights drawn like a fresh linear layer's (N(0, 1/(l*D))): the random-weight baseline a fitted
    pool must beat."""
    gen = torch.Generator().manual_seed(seed)
    return {n: torch.randn(t.shape, generator=gen, dtype=torch.float64).to(like.device) * t.shape[-2] ** -0.5
            if n.startswith("w_") else t for n, t in mean_pool_init(spec, like).items()}


def fit_pool(spec, train: TrainSource | Inputs, evaluation: Inputs | None = None, *, steps: int = 100,
             lr: float = 1e-2, refresh: int = 5, seed: int = 0) -> tuple[dict, dict]:
    """Linear pool weights fitted to the dense output through the compression branch (relative MSE of the compression
    branch's output against dense causal attention), from the mean-pool initialisation, over training batches. The
    log has the held-out loss of random weights, of mean pooling and of the fit."""
    source = (lambda i: train) if isinstance(train, Inputs) else train
    params = None
    losses, shape = [], None
    for step in range(steps):
        if step % refresh == 0:
            d = source(step // refresh)
            x = Inputs(d.q.float(), d.k.float(), d.v.float())
            shape = tuple(x.q.shape[:2])
            target = dense_attention(spec, x).out
            if params is None:
                params = {n: torch.nn.Parameter(t.float()) for n, t in mean_pool_init(spec, x.q).items()}
                opt = torch.optim.Adam(params.values(), lr=lr)
        opt.zero_grad()
        loss = _pool_loss(spec, x, params, target)
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    log = {"what": "linear pool", "how": f"Adam lr {lr}, {steps} steps from mean pooling on the relative MSE of the "
                                         f"compression branch's output vs dense attention, float32, train batches "
                                         f"of B={shape[0] if shape else 0} T={shape[1] if shape else 0}",
           "train_loss_first": losses[0] if losses else None, "train_loss_last": losses[-1] if losses else None}
    fitted = (mean_pool_init(spec, torch.zeros(())) if params is None else
              {n: p.detach().to(torch.float64) for n, p in params.items()})
    if evaluation is not None:
        ev = Inputs(evaluation.q.to(torch.float64), evaluation.k.to(torch.float64), evaluation.v.to(torch.float64))
        target = dense_attention(spec, ev).out
        with torch.no_grad():
            log["eval_loss_unfitted"] = float(_pool_loss(spec, ev, random_pool(spec, ev.q, seed), target))
            log["eval_loss_mean_pool"] = float(_pool_loss(spec, ev, mean_pool_init(spec, ev.q), target))
            log["eval_loss_fitted"] = float(_pool_loss(spec, ev, {n: t.to(ev.q.device) for n, t in fitted.items()},
                                                       target))
    return fitted, log


def fit_scorers(spec, train: TrainSource | Inputs, evaluation: Inputs, *, steps: int = 300,
                seed: int = 0, lr: float = 1e-2) -> tuple[Fitted, Fitted]:
    """(unfitted, fitted) learnable inputs of a variant; both empty for a parameter-free variant (mean pooling and
    the compression scorer learn nothing)."""
    unfitted, fitted = Fitted(), Fitted()
    logs = []
    if spec.selection is not None and spec.selection.scorer == "indexer":
        unfitted.indexer, fitted.indexer, log = fit_indexer(spec, train, evaluation, steps=steps, seed=seed, lr=lr)
        logs.append(log)
    if spec.needs_compressed_kv and spec.compression.pool == "linear":
        fitted.pool, log = fit_pool(spec, train, evaluation, steps=max(1, steps // 3) if steps else 0, lr=lr,
                                    seed=seed)
        logs.append(log)
    fitted.log = {"fitted": [l["what"] for l in logs], "details": logs}
    return unfitted, fitted


# ---------------------------------------------------------------------------------------------------------------
# Metrics
# ---------------------------------------------------------------------------------------------------------------

def _mean(x: torch.Tensor) -> float:
    return float(x.to(torch.float64).mean()) if x.numel() else float("nan")


def _quantile(x: torch.Tensor, q: float) -> float:
    return float(torch.quantile(x.to(torch.float64).flatten(), q)) if x.numel() else float("nan")


def selected_mask(spec, indices: torch.Tensor, T: int) -> torch.Tensor:
    """Bool [B, T, Hkv, T]: the tokens s <= t each (query, kv group) attends in the selection branch."""
    unit = selection_unit(spec)
    pos = torch.arange(T, device=indices.device)
    return mask_from_indices(indices, unit, T) & (pos[None, :] <= pos[:, None])[None, :, None, :]


def oracle_indices(spec, mass: torch.Tensor) -> torch.Tensor:
    """The best selection of the variant's shape (unit, top_k, forced blocks): units ranked by their true dense
    group mass. Its recall bounds what any scorer can reach with that unit and budget."""
    sel = spec.selection
    unit = selection_unit(spec)
    B, T, Hkv, S = mass.shape
    n = -(-S // unit)
    scores = torch.nn.functional.pad(mass, (0, n * unit - S)).reshape(B, T, Hkv, n, unit).sum(-1)
    pos = torch.arange(T, device=mass.device)
    initial, local = (sel.initial, sel.local) if sel.granularity == "block" else (0, 0)
    return top_units(scores, pos, unit, sel.top_k, initial, local)


def _gated(spec, res) -> torch.Tensor:
    """Branch outputs mixed by mass gates g_c = softmax_c(lse_c): attention over the branches merged as one softmax
    (exact when their key sets are disjoint). Random gates would make the gated error meaningless; a trained gate
    learns its own mix."""
    if not spec.gated:
        return res.out
    w = torch.softmax(torch.nan_to_num(res.lse, neginf=-1e30), dim=-1)                # [B, T, Hq, n_branches]
    w = torch.where(torch.isinf(res.lse) & (res.lse < 0), torch.zeros_like(w), w)
    return sum(w[..., c, None] * res.branch_out[b] for c, b in enumerate(spec.branches))


def fidelity(spec, x: Inputs, fitted: Fitted | None = None, *, dense: Dense | None = None, eval_from: int | None = None,
             query_chunk: int = 256) -> dict:
    """Fidelity of one variant on one split, against dense causal attention on the same q/k/v (float64 reference).

    Over the evaluated queries (t >= eval_from, default T/2: every query there has more candidates than the smallest
    budgets, so early queries that see everything do not inflate the numbers):
      recall         mean over (b, t, g) of the dense group mass inside the selected tokens; recall_p10: its 10th
                     percentile; recall_oracle: the same for the best selection of this unit size and budget
      cover_window   mass inside the window; cover_union: inside selected tokens or the window; cover_compression:
                     mass on the tokens the visible compression blocks cover (coarse: pooled, not attended one by one)
      err_<branch>   relative error of one branch's output alone vs dense; err_gated: the mass-gated output
      needle_*       (retrieval) hit rate of the needle token in the selection / window / oracle, its dense mass
    """
    check_shapes(spec, x)
    B, T = x.shape
    eval_from = T // 2 if eval_from is None else eval_from
    dense = dense_attention(spec, x, query_chunk) if dense is None else dense
    res = reference.nsa_forward(spec, **variant_inputs(spec, x, fitted), query_chunk=query_chunk)
    rows = slice(eval_from, T)
    m = {"T": T, "batch": B, "eval_queries": T - eval_from}
    for b, o in res.branch_out.items():
        m[f"err_{b}"] = reference.rel_err(o[:, rows], dense.out[:, rows])
    m["err_gated"] = reference.rel_err(_gated(spec, res)[:, rows], dense.out[:, rows])
    pos = torch.arange(T, device=x.q.device)
    causal = (pos[None, :] <= pos[:, None])[None, :, None, :]
    mass = dense.mass
    covered = torch.zeros_like(causal.expand_as(mass))
    if spec.has["selection"]:
        sel = selected_mask(spec, res.indices, T)
        r = (mass * sel).sum(-1)[:, rows]
        m["recall"] = _mean(r)
        m["recall_p10"] = _quantile(r, 0.1)
        m["recall_by_kv_head"] = [_mean(r[:, :, g]) for g in range(r.shape[2])]
        orc = selected_mask(spec, oracle_indices(spec, mass), T)
        m["recall_oracle"] = _mean((mass * orc).sum(-1)[:, rows])
        m["selected_tokens"] = _mean(sel[:, rows].sum(-1).to(torch.float64))
        covered = covered | sel
    if spec.has["window"]:
        w = spec.window.size
        win = causal & (pos[None, :] > pos[:, None] - w)[None, :, None, :]
        m["cover_window"] = _mean((mass * win).sum(-1)[:, rows])
        covered = covered | win
    if spec.has["selection"] or spec.has["window"]:
        m["cover_union"] = _mean((mass * covered).sum(-1)[:, rows])
    if spec.has["compression"]:
        l, d = spec.compression.block, spec.compression.stride
        end = torch.where(pos >= l - 1, torch.div(pos - l + 1, d, rounding_mode="floor") * d + l - 1, -1)
        cmp_cov = (pos[None, :] <= end[:, None])[None, :, None, :] & causal
        m["cover_compression"] = _mean((mass * cmp_cov).sum(-1)[:, rows])
        m["compression_blocks"] = num_compressed_blocks(spec, T)
    if x.needles is not None and spec.has["selection"]:
        b, t, g, s = x.needles.unbind(-1)
        m["needles"] = int(x.needles.shape[0])
        m["needle_hit"] = _mean(sel[b, t, g, s].to(torch.float64))
        m["needle_hit_oracle"] = _mean(orc[b, t, g, s].to(torch.float64))
        m["needle_mass"] = _mean(mass[b, t, g, s])
        if spec.has["window"]:
            m["needle_hit_window"] = _mean((t - s < spec.window.size).to(torch.float64))
        probe_out = res.branch_out["selection"][b, t]                  # [N, Hq, Dv]
        m["needle_err_selection"] = reference.rel_err(probe_out, dense.out[b, t])
    return m


MIN_FIT_GAIN = 0.10          # a fit must cut the held-out loss of random weights by at least this fraction


def check_fit(details: list[dict], min_gain: float = MIN_FIT_GAIN) -> dict:
    """Whether every fit in `details` (one log per fitted scorer and seed) worked: its held-out loss at least
    `min_gain` below that of random weights. A fit that does not (a diverged optimiser, too few steps, a map that
    cannot express the target) measures an untrained scorer, so its rows must not feed a conclusion."""
    failures = []
    for d in details:
        r, f = d.get("eval_loss_unfitted"), d.get("eval_loss_fitted")
        if r is None or f is None:
            continue
        d["gain"] = 1.0 - f / r if r else float("nan")
        if not f <= (1.0 - min_gain) * r:              # NaN fails too
            failures.append(f"{d['what']} (seed {d.get('seed', 0)}): held-out loss {f:.3f} vs {r:.3f} with random "
                            f"weights, not {100 * min_gain:.0f}% below")
    return {"ok": not failures, "min_gain": min_gain, "reason": "; ".join(failures)}


def _stats(rows: list[dict]) -> tuple[dict, dict]:
    """Mean and sample standard deviation (0 for one row) of each numeric entry (lists elementwise) over rows."""
    mean, sd = {}, {}
    n = len(rows)
    for key, first in rows[0].items():
        if isinstance(first, bool) or not isinstance(first, (int, float, list)):
            continue
        vals = [r.get(key) for r in rows]
        if isinstance(first, list):
            t = torch.tensor(vals, dtype=torch.float64)
        elif all(isinstance(v, (int, float)) for v in vals):
            t = torch.tensor(vals, dtype=torch.float64)
        else:
            continue
        mu = t.mean(0)
        sigma = t.std(0) if n > 1 else torch.zeros_like(mu)
        if isinstance(first, list):
            mean[key], sd[key] = mu.tolist(), sigma.tolist()
        else:
            mean[key] = first if isinstance(first, int) and len(set(vals)) == 1 else float(mu)
            sd[key] = float(sigma)
    return mean, sd


def evaluate_variant(spec, regime: str, T: int, *, batch: int = 2, train_batch: int = 4, train_T: int = 256,
                     fit_steps: int = 300, fit_lr: float = 1e-2, seeds: int = 1, eval_from: float | int = 0.5,
                     n_needles: int = 16, device="cpu", base_dir: Path | None = None, query_chunk: int = 256,
                     min_fit_gain: float = MIN_FIT_GAIN) -> dict:
    """Everything the sweep records about one (variant, regime, T), repeated `seeds` times: fit the learnable scorers
    on training draws, then measure the fitted (and, for a learned scorer, the unfitted: random weights) variant on
    the eval split. Each repeat draws new training and eval content of the same synthetic model and starts the fit
    from new random weights (a captured file has one eval split: repeats differ in the fit only), so the spread
    over repeats is the noise a difference between variants must exceed. `metrics` are the means, `metrics_sd`
    the standard deviations, `per_seed` every repeat; `fit_check` says whether every fit beat random weights by
    `min_fit_gain` on held-out data. `eval_from`: first evaluated query, as a fraction of T (< 1) or a position."""
    if seeds < 1:
        raise ValueError(f"seeds={seeds}: at least 1 (fidelity.seeds in the sweep file; 3 or more to judge noise)")
    per_seed, unfit_seed, details, fitted_what = [], [], [], []
    dense = None
    for i in range(seeds):
        train, evaluation = splits(spec, regime, T, batch=batch, train_batch=train_batch, n_needles=n_needles,
                                   device=device, base_dir=base_dir, train_T=train_T, seed=i)
        check_shapes(spec, evaluation)
        Te = evaluation.shape[1]
        start = int(round(eval_from * Te)) if isinstance(eval_from, float) and eval_from < 1 else int(eval_from)
        if dense is None or not regime.startswith("file:"):        # a file's eval split is the same every repeat
            dense = dense_attention(spec, evaluation, query_chunk)
        init_seed = seed_of(spec.hash) if i == 0 else seed_of(spec.hash, i)
        unfitted, fitted = fit_scorers(spec, train, evaluation, steps=fit_steps, seed=init_seed, lr=fit_lr)
        per_seed.append(fidelity(spec, evaluation, fitted, dense=dense, eval_from=start, query_chunk=query_chunk))
        fitted_what = fitted.log["fitted"]
        details += [{**d, "seed": i} for d in fitted.log["details"]]
        if fitted_what:
            base = fidelity(spec, evaluation, unfitted, dense=dense, eval_from=start, query_chunk=query_chunk)
            unfit_seed.append({k: base[k] for k in ("recall", "err_selection", "err_gated", "needle_hit") if k in base})
    metrics, metrics_sd = _stats(per_seed)
    out = {"metrics": metrics, "metrics_sd": metrics_sd, "seeds": seeds, "per_seed": per_seed,
           "fit": {"fitted": fitted_what, "details": details}}
    if fitted_what:
        out["unfitted"], out["unfitted_sd"] = _stats(unfit_seed)
        out["scorer"] = "fitted " + " + ".join(fitted_what)
        out["fit_check"] = check_fit(details, min_fit_gain)
    else:
        out["scorer"] = "parameter-free"
    return out


__all__ = ["Dense", "Fitted", "IndexerMap", "Inputs", "MIN_FIT_GAIN", "REGIMES", "check_fit", "check_shapes",
           "dense_attention", "random_pool",
           "evaluate_variant", "fidelity", "fit_indexer", "fit_pool", "fit_scorers", "load_captured",
           "make_regime", "mean_pool_init", "oracle_indices", "seed_of", "selected_mask", "splits",
           "variant_inputs"]
