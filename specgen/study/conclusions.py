"""The sweep report's conclusions: which variant recalls more, said only where the numbers allow it.

Rules (docs/sweeps.md, "Conclusions"):

* Variants are compared only within one regime, one length and one budget (a captured model: within one layer, and
  over all layers together).
* Rows whose fit failed (`fidelity.check_fit`) are left out and named with the reason.
* Each row is a mean over `fidelity.seeds` repeats with standard deviation s; a difference between two rows counts
  only when it exceeds 2 * sqrt(s_a^2 + s_b^2), two standard deviations of the difference of two repeats. Otherwise
  the conclusion is "undecided". With one repeat there is no spread: every comparison is undecided.
* Each conclusion names the oracle ceiling of its group: the recall of the best selection of any measured shape.
"""

from __future__ import annotations

import math


def fmt(x, digits: int = 3) -> str:
    if x is None:
        return ""
    if isinstance(x, float) and math.isnan(x):
        return "nan"
    return f"{x:.{digits}f}" if isinstance(x, float) else str(x)


def pm(row: dict, metric: str = "recall") -> str:
    """'0.854 ± 0.010'."""
    sd = row.get(f"{metric}_sd")
    return fmt(row.get(metric)) + (f" ± {fmt(sd)}" if isinstance(sd, (int, float)) else "")


def compare(a: dict, b: dict, metric: str = "recall", sigmas: float = 2.0) -> dict:
    """Is a's metric above b's beyond the noise? {diff, margin, decided, winner (a, b or None)}."""
    diff = a[metric] - b[metric]
    seeds = min(a.get("seeds") or 1, b.get("seeds") or 1)
    sd = math.sqrt((a.get(f"{metric}_sd") or 0.0) ** 2 + (b.get(f"{metric}_sd") or 0.0) ** 2)
    margin = sigmas * sd
    decided = seeds >= 2 and abs(diff) > margin
    return {"diff": diff, "margin": margin, "decided": decided, "seeds": seeds,
            "winner": (a if diff > 0 else b) if decided else None}


def usable(row: dict) -> bool:
    return row.get("status") == "ok" and row.get("recall") is not None and row.get("fit_ok", True)


def _verdict(a: dict, b: dict, name_a: str, name_b: str) -> str:
    c = compare(a, b)
    head = f"{name_a} `{a['label']}` recall {pm(a)} vs {name_b} `{b['label']}` {pm(b)}"
    if c["seeds"] < 2:
        return head + ": **undecided** (one seed: no spread to judge the difference by; set fidelity.seeds: 3)"
    if not c["decided"]:
        return head + (f": **undecided** (difference {fmt(abs(c['diff']))} is within the noise, "
                       f"2σ = {fmt(c['margin'])})")
    win = name_a if c["winner"] is a else name_b
    return head + f": **{win}** by {fmt(abs(c['diff']))} (> 2σ = {fmt(c['margin'])})"


def group_lines(rows: list[dict], where: str, granularity_varies: bool) -> list[str]:
    """The conclusion for one (regime, length, budget) group of rows."""
    good = [r for r in rows if usable(r)]
    failed = [r for r in rows if r.get("status") == "ok" and not r.get("fit_ok", True)]
    oracle = max((r for r in rows if r.get("recall_oracle") is not None), key=lambda r: r["recall_oracle"],
                 default=None)
    ceiling = f" (oracle ceiling {fmt(oracle['recall_oracle'])}, `{oracle['label']}`)" if oracle else ""
    parts = []
    if len(good) < 2:
        parts.append("nothing to compare" + (f": only `{good[0]['label']}` recall {pm(good[0])}" if good else ""))
    elif granularity_varies and {r.get("granularity") for r in good} >= {"block", "token"}:
        tok = max((r for r in good if r.get("granularity") == "token"), key=lambda r: r["recall"])
        blk = max((r for r in good if r.get("granularity") == "block"), key=lambda r: r["recall"])
        parts.append(_verdict(tok, blk, "token-level", "block-level"))
        blk_ceiling = max((r for r in rows if r.get("granularity") == "block"
                           and r.get("recall_oracle") is not None), key=lambda r: r["recall_oracle"], default=None)
        if blk_ceiling is not None:
            parts.append(f"block level's own ceiling here: {fmt(blk_ceiling['recall_oracle'])} "
                         f"(`{blk_ceiling['label']}`)")
    else:
        ranked = sorted(good, key=lambda r: -r["recall"])
        parts.append(_verdict(ranked[0], ranked[1], "best", "runner-up"))
    text = f"- **{where}**{ceiling}: " + "; ".join(parts) + "."
    if failed:
        text += " Left out (fit failed): " + "; ".join(f"`{r['label']}` ({r.get('fit_reason') or 'fit failed'})"
                                                        for r in failed) + "."
    return [text]


def headline(rows: list[dict], granularity_varies: bool) -> list[str]:
    """Conclusions per regime x length x budget, in that order; rows carry regime, seqlen, budget (or None),
    granularity, label, recall, recall_sd, recall_oracle, seeds, status, fit_ok, fit_reason."""
    lines = []
    groups = sorted({(r["regime"], r["seqlen"], r.get("budget")) for r in rows},
                    key=lambda g: (g[0], g[1], g[2] is None, g[2] or 0))
    for regime, T, budget in groups:
        sub = [r for r in rows if (r["regime"], r["seqlen"], r.get("budget")) == (regime, T, budget)]
        where = f"{regime}, T={T}" + (f", {budget} tokens" if budget is not None else "")
        lines += group_lines(sub, where, granularity_varies)
    return lines


__all__ = ["compare", "fmt", "group_lines", "headline", "pm", "usable"]
