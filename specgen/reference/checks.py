"""Checks used by every kernel test: is a selection valid for the reference scores, and how far apart are two tensors.

Random inputs make near-ties common, so a kernel and the reference may pick different, equally good units. A
selection is therefore checked for validity (rules + top-k within a tolerance), not for equality; the kernel's
indices are then fed to the reference to compare outputs (docs/testing.md, "Checking selections").
"""

from __future__ import annotations

import torch


def _where(mask: torch.Tensor) -> tuple[int, ...]:
    """The first (b, t, g) where `mask` [B, T, Hkv] is true."""
    return tuple(int(x) for x in mask.nonzero()[0])


def _fail(what: str, bad: torch.Tensor, indices: torch.Tensor, scores: torch.Tensor | None = None, extra=""):
    b, t, g = _where(bad)
    row = indices[b, t, g].tolist()
    msg = (f"selection invalid: {what} at {int(bad.sum())} (query, kv group) rows; first at b={b}, t={t}, "
           f"kv group {g}: indices {row}")
    if scores is not None:
        valid = [j for j in row if j >= 0]
        msg += f", their scores {[round(float(scores[b, t, g, j]), 6) for j in valid]}"
    raise AssertionError(msg + extra)


def check_selection(spec, indices: torch.Tensor, scores: torch.Tensor, T: int, *, tol: float = 1e-3) -> None:
    """Assert that `indices` is a valid selection for `scores` under the spec's rules (block or token granularity).

    indices [B, Tq, Hkv, top_k] int32; scores [B, Tq, Hkv, N] ranks the units (S for blocks, I for tokens); the Tq
    rows are the last positions of a T-token sequence. Checked: dtype and shape; entries in [-1, N); valid entries
    strictly ascending (so no duplicates), then -1 padding; every entry a candidate (j*unit <= t); forced blocks
    present; count = min(top_k, #candidates); and a top-k of `scores` within `tol`: every chosen non-forced unit's
    score >= every unchosen candidate's score - tol * (1 + |that score|).
    """
    sel = spec.selection
    unit = sel.block if sel.granularity == "block" else 1
    initial, local = (sel.initial, sel.local) if sel.granularity == "block" else (0, 0)
    if indices.dtype != torch.int32:
        raise AssertionError(f"selection invalid: indices must be int32, got {indices.dtype}")
    if indices.dim() != 4 or indices.shape[2] != spec.heads.kv or indices.shape[3] != sel.top_k:
        raise AssertionError(f"selection invalid: indices must be [B, T, Hkv={spec.heads.kv}, top_k={sel.top_k}], "
                             f"got {list(indices.shape)}")
    if tuple(scores.shape[:3]) != tuple(indices.shape[:3]):
        raise AssertionError(f"scores {list(scores.shape)} do not match indices {list(indices.shape)} in [B, T, Hkv]")
    B, Tq, Hkv, K = indices.shape
    n_units = -(-T // unit)
    if scores.shape[-1] < n_units:
        raise AssertionError(f"scores have {scores.shape[-1]} units, but T={T} has {n_units} of {unit} tokens")

    idx = indices.long().cpu()
    scores = scores.detach().to(torch.float64).cpu()[..., :n_units]
    t = torch.arange(T - Tq, T)[None, :, None, None]                                  # query positions
    valid = idx >= 0

    out_of_range = ((idx < -1) | (idx >= n_units)).any(-1)
    if out_of_range.any():
        _fail(f"entries outside [-1, {n_units})", out_of_range, idx)
    # Padding last: once an entry is -1, every later one is too.
    padding_inside = (~valid[..., :-1] & valid[..., 1:]).any(-1)
    if padding_inside.any():
        _fail("-1 padding before a valid entry (padding must come last)", padding_inside, idx)
    sorted_ = torch.sort(torch.where(valid, idx, n_units), dim=-1).values          # padding read as n_units
    duplicate = ((sorted_[..., :-1] == sorted_[..., 1:]) & (sorted_[..., :-1] < n_units)).any(-1)
    if duplicate.any():
        _fail("duplicate entries", duplicate, idx)
    pairs_valid = valid[..., :-1] & valid[..., 1:]
    descending = (pairs_valid & (idx[..., :-1] > idx[..., 1:])).any(-1)
    if descending.any():
        _fail("valid entries not ascending", descending, idx)
    future = (valid & (idx * unit > t)).any(-1)
    if future.any():
        _fail("a unit that starts after the query (j*unit > t)", future, idx)

    n_candidates = t[..., 0] // unit + 1                                               # [1, Tq, 1]
    expected = torch.clamp(n_candidates, max=K).expand(B, Tq, Hkv)
    wrong_count = valid.sum(-1) != expected
    if wrong_count.any():
        b, tt, g = _where(wrong_count)
        _fail("wrong number of entries", wrong_count, idx,
              extra=f" (expected min(top_k={K}, candidates={int(n_candidates[0, tt, 0])}))")

    # Membership of each unit in the chosen set, [B, Tq, Hkv, n_units].
    chosen = torch.zeros(B, Tq, Hkv, n_units + 1, dtype=torch.bool)
    chosen.scatter_(-1, torch.where(valid, idx, n_units), True)
    chosen = chosen[..., :n_units]
    j = torch.arange(n_units)
    newest = t[..., 0, None] // unit                                                   # [1, Tq, 1, 1]
    candidate = j <= newest
    forced = candidate & ((j < initial) | (j > newest - local))
    missing_forced = (forced & ~chosen).any(-1)
    if missing_forced.any():
        b, tt, g = _where(missing_forced)
        need = j[(forced & ~chosen)[b, tt, g]].tolist()
        _fail("forced blocks missing", missing_forced, idx, extra=f" (missing {need})")

    # Top-k within tolerance: the worst chosen free unit must not lose to the best unchosen candidate.
    free_chosen = chosen & ~forced
    unchosen = candidate & ~chosen
    inf = torch.tensor(float("inf"), dtype=torch.float64)
    worst_chosen = torch.where(free_chosen, scores, inf).amin(-1)
    best_unchosen = torch.where(unchosen, scores, -inf).amax(-1)
    slack = tol * (1 + best_unchosen.abs())
    beaten = worst_chosen < best_unchosen - torch.nan_to_num(slack, posinf=0.0)
    if beaten.any():
        b, tt, g = _where(beaten)
        _fail("not a top-k of the scores", beaten, idx, scores,
              extra=f"; worst chosen {float(worst_chosen[b, tt, g]):.6g} < best unchosen "
                    f"{float(best_unchosen[b, tt, g]):.6g} (unit "
                    f"{int(torch.where(unchosen[b, tt, g], scores[b, tt, g], -inf).argmax())}) beyond tol={tol}")


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """||a - b|| / ||b|| in float64.

    Entries equal in both (including matching infinities, e.g. lse = -inf of a query that sees nothing) count as
    no error, and infinities are left out of ||b||; a NaN anywhere gives nan, an infinity in only one of them inf.
    When b has no nonzero finite entry the absolute error ||a - b|| is returned, so two zero tensors give 0.
    """
    a = a.detach().to(torch.float64)
    b = b.detach().to(torch.float64)
    if a.shape != b.shape:
        raise ValueError(f"rel_err of tensors of different shapes {list(a.shape)} and {list(b.shape)}")
    if a.isnan().any() or b.isnan().any():
        return float("nan")
    diff = torch.where(a == b, torch.zeros_like(a), a - b)
    if not diff.isfinite().all():
        return float("inf")
    num = torch.linalg.vector_norm(diff).item()
    den = torch.linalg.vector_norm(torch.where(b.isfinite(), b, torch.zeros_like(b))).item()
    return num / den if den > 0 else num
