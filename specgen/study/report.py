"""A sweep's results as tables (CSV, JSON), a Markdown report and plots.

Reads `<out>/results.jsonl` (the latest record per key wins) and the sweep's points, and writes results.csv,
results.json, report.md and plots/ (matplotlib when installed; without it the report says so and has no plots).
"""

from __future__ import annotations

import csv
import json
import math
import time
from pathlib import Path
from typing import Any

FIDELITY_COLUMNS = ("recall", "recall_p10", "recall_oracle", "cover_window", "cover_union", "cover_compression",
                    "err_selection", "err_gated", "err_compression", "err_window", "needle_hit", "needle_hit_oracle",
                    "needle_mass", "needle_err_selection", "selected_tokens")
UNFITTED_COLUMNS = ("recall", "err_selection", "err_gated", "needle_hit")


def read_records(path: Path) -> list[dict]:
    """Every record of an append-only JSONL file, in order; a torn last line (an interrupted write) is ignored."""
    if not path.exists():
        return []
    out = []
    for line in path.read_text(encoding="utf-8").splitlines():
        line = line.strip()
        if not line:
            continue
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return out


def _latest(records: list[dict]) -> dict[str, dict]:
    """The latest record per key, preferring a finished one over a later failure or skip."""
    out: dict[str, dict] = {}
    for r in records:
        key = r.get("key")
        if key is None:
            continue
        if key in out and out[key].get("status") == "ok" and r.get("status") != "ok":
            continue
        out[key] = r
    return out


def _flops(spec_dict: dict | None, T: int) -> float | None:
    if spec_dict is None:
        return None
    try:
        from ..compile.analysis import flops
        from ..model.spec import spec_from_mapping

        return float(flops(spec_from_mapping(spec_dict), T))
    except Exception:
        return None


def fidelity_rows(points: list[dict], records: list[dict]) -> list[dict]:
    """One row per measured (variant, regime, seqlen), in point order."""
    by_hash = {p["spec_hash"]: p for p in points if p["status"] == "valid"}
    rows = []
    flop_cache: dict[tuple, float | None] = {}
    for r in _latest(records).values():
        if r.get("part") != "fidelity" or r.get("spec_hash") not in by_hash:
            continue
        p = by_hash[r["spec_hash"]]
        row: dict[str, Any] = {"index": p["index"], "label": p["label"], "spec_name": r.get("spec_name"),
                               "spec_hash": r["spec_hash"], "status": r.get("status")}
        row.update({f"axis:{k}": v for k, v in p["effective"].items()})
        row.update({"top_k": p["top_k"], "regime": r["regime"], "seqlen": r["seqlen"], "scorer": r.get("scorer", "")})
        m = r.get("metrics") or {}
        row.update({c: m.get(c) for c in FIDELITY_COLUMNS})
        unf = r.get("unfitted") or {}
        row.update({f"{c}_unfitted": unf.get(c) for c in UNFITTED_COLUMNS})
        details = (r.get("fit") or {}).get("details") or []
        idx = next((d for d in details if d.get("what") == "indexer"), {})
        row["distill_eval_unfitted"] = idx.get("eval_loss_unfitted")
        row["distill_eval_fitted"] = idx.get("eval_loss_fitted")
        key = (r["spec_hash"], r["seqlen"])
        if key not in flop_cache:
            flop_cache[key] = _flops(p.get("spec"), r["seqlen"])
        row["forward_gflop"] = flop_cache[key] / 1e9 if flop_cache[key] else None
        row.update({"seconds": r.get("seconds"), "device": r.get("device"), "date": r.get("date"),
                    "commit": r.get("commit"), "error": r.get("error", ""), "build_error": r.get("build_error", "")})
        rows.append(row)
    rows.sort(key=lambda x: (x["regime"], x["seqlen"], x["index"]))
    return rows


def speed_rows(points: list[dict], records: list[dict]) -> list[dict]:
    by_hash = {p["spec_hash"]: p for p in points if p["status"] == "valid"}
    rows = []
    for r in _latest(records).values():
        if r.get("part") != "speed" or r.get("spec_hash") not in by_hash:
            continue
        p = by_hash[r["spec_hash"]]
        s = r.get("speed")
        row = {"index": p["index"], "label": p["label"], "spec_hash": r["spec_hash"], "status": r.get("status"),
               "regime": r["regime"], "seqlen": r["seqlen"], "device": r.get("device")}
        if isinstance(s, dict):
            dense = s.get("dense_forward_ms") or {}
            dense_fb = s.get("dense_fwd_bwd_ms") or {}
            row.update({"forward_ms": s.get("forward_ms"), "forward_tflops": s.get("forward_tflops"),
                        "fwd_bwd_ms": s.get("fwd_bwd_ms"),
                        "dense_cudnn_ms": dense.get("cudnn"), "dense_flash_ms": dense.get("flash"),
                        "dense_fwd_bwd_ms": min((v for v in dense_fb.values() if isinstance(v, (int, float))),
                                                default=None)})
            best = [v for v in dense.values() if isinstance(v, (int, float))]
            if best and isinstance(s.get("forward_ms"), (int, float)):
                row["speedup_vs_best_dense"] = min(best) / s["forward_ms"]
        else:
            row["note"] = s or r.get("error", "")
        rows.append(row)
    rows.sort(key=lambda x: (x["regime"], x["seqlen"], x["index"]))
    return rows


# ---------------------------------------------------------------------------------------------------------------
# Files
# ---------------------------------------------------------------------------------------------------------------

def _fmt(x, digits=3) -> str:
    if x is None:
        return ""
    if isinstance(x, bool):
        return str(x)
    if isinstance(x, float):
        if math.isnan(x):
            return "nan"
        return f"{x:.{digits}f}"
    return str(x)


def write_csv(path: Path, rows: list[dict]) -> None:
    columns: list[str] = []
    for r in rows:
        for c in r:
            if c not in columns:
                columns.append(c)
    with path.open("w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, fieldnames=columns)
        w.writeheader()
        for r in rows:
            w.writerow({c: (json.dumps(v) if isinstance(v, (dict, list)) else v) for c, v in r.items()})


def _md_table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def _axes_text(effective: dict) -> str:
    return ", ".join(f"{k}={v if not isinstance(v, dict) else v.get('label', v)}" for k, v in effective.items())


def _pareto(points: list[tuple[float, float]]) -> list[int]:
    """Indices of points not dominated (lower cost x, higher quality y)."""
    front = []
    for i, (x, y) in enumerate(points):
        if not any((x2 <= x and y2 >= y) and (x2 < x or y2 > y) for j, (x2, y2) in enumerate(points) if j != i):
            front.append(i)
    return front


def write_plots(out_dir: Path, fid: list[dict], spd: list[dict], axes: list[str], fmt: str = "png") -> list[str]:
    """Pareto fronts (cost vs recall per regime) and each axis' effect; [] when matplotlib is missing."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        import matplotlib.ticker
    except ImportError:
        return []
    plots = out_dir / "plots"
    plots.mkdir(exist_ok=True)
    made = []
    ok = [r for r in fid if r["status"] == "ok" and r.get("recall") is not None]
    groups = sorted({(r["regime"], r["seqlen"]) for r in ok})
    if groups:
        timed = [r for r in spd if r.get("status") == "ok" and r.get("regime") == "structured"
                 and isinstance(r.get("forward_ms"), float)]
        longest = max((r["seqlen"] for r in timed), default=None)
        ms = {r["spec_hash"]: r["forward_ms"] for r in timed if r["seqlen"] == longest}
        fig, axs = plt.subplots(1, len(groups), figsize=(5.5 * len(groups), 4.2), squeeze=False)
        for ax, (regime, T) in zip(axs[0], groups):
            rows = [r for r in ok if r["regime"] == regime and r["seqlen"] == T]
            use_ms = bool(ms) and all(r["spec_hash"] in ms for r in rows)
            xs = [ms[r["spec_hash"]] if use_ms else (r["forward_gflop"] or 0.0) * 1e3 for r in rows]
            ys = [r["recall"] for r in rows]
            front = _pareto(list(zip(xs, ys)))
            ax.scatter(xs, ys, c=["tab:red" if i in front else "tab:blue" for i in range(len(rows))])
            for x, y, r in zip(xs, ys, rows):
                ax.annotate(r["label"], (x, y), fontsize=7, xytext=(3, 3), textcoords="offset points")
            fx = sorted((xs[i], ys[i]) for i in front)
            ax.plot([a for a, _ in fx], [b for _, b in fx], "r--", lw=0.8)
            ax.set_xlabel(f"forward ms (GPU, structured regime, T={longest})" if use_ms else
                          f"forward MFLOP at T={T} (specgen.compile.analysis; no GPU timing)")
            ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(5))
            ax.set_ylabel("recall of dense attention mass")
            ax.set_title(f"{regime}, T={T}: Pareto front in red")
            ax.grid(alpha=0.3)
        fig.tight_layout()
        name = f"plots/pareto.{fmt}"
        fig.savefig(out_dir / name, dpi=110)
        plt.close(fig)
        made.append(name)
    varying = [a for a in axes if len({json.dumps(r.get(f"axis:{a}"), sort_keys=True) for r in ok}) > 1]
    if varying and ok:
        metrics = [("recall", "recall"), ("err_gated", "gated output rel. error")]
        if any(r.get("needle_hit") is not None for r in ok):
            metrics.append(("needle_hit", "needle hit rate"))
        fig, axs = plt.subplots(len(metrics), len(varying), figsize=(4.2 * len(varying), 3.2 * len(metrics)),
                                squeeze=False)
        for j, axis in enumerate(varying):
            cats = []
            for r in ok:
                v = json.dumps(r.get(f"axis:{axis}"), sort_keys=True)
                if v not in cats:
                    cats.append(v)
            for i, (metric, title) in enumerate(metrics):
                ax = axs[i][j]
                for regime, T in groups:
                    pts = [(cats.index(json.dumps(r.get(f"axis:{axis}"), sort_keys=True)), r[metric]) for r in ok
                           if r["regime"] == regime and r["seqlen"] == T and r.get(metric) is not None]
                    if not pts:
                        continue
                    sc = ax.scatter([p[0] for p in pts], [p[1] for p in pts], s=14, alpha=0.6)
                    means = [(c, sum(y for x, y in pts if x == c) / sum(1 for x, _ in pts if x == c))
                             for c in range(len(cats)) if any(x == c for x, _ in pts)]
                    ax.plot([c for c, _ in means], [m for _, m in means], color=sc.get_facecolor()[0],
                            label=f"{regime} T={T}")
                ax.set_xticks(range(len(cats)), [c.strip('"') for c in cats], fontsize=8)
                ax.set_xlabel(axis)
                ax.set_ylabel(title)
                ax.grid(alpha=0.3)
                if i == 0 and j == 0:
                    ax.legend(fontsize=7)
        fig.suptitle("effect of each axis (dots: variants; lines: mean over the other axes)")
        fig.tight_layout()
        name = f"plots/axes.{fmt}"
        fig.savefig(out_dir / name, dpi=110)
        plt.close(fig)
        made.append(name)
    return made


def _speed_headline(rows: list[dict]) -> list[str]:
    """Per measured length (one regime: random if measured): the fastest variant of each label family (the label's
    first word: block, token, ...) against the best dense forward of the same run."""
    lines = []
    for T in sorted({r["seqlen"] for r in rows}):
        at = [r for r in rows if r["seqlen"] == T and isinstance(r.get("forward_ms"), (int, float))]
        regimes = sorted({r["regime"] for r in at})
        regime = "random" if "random" in regimes else (regimes[0] if regimes else None)
        at = [r for r in at if r["regime"] == regime]
        if not at:
            continue
        best = {}
        for r in at:
            family = r["label"].split("_")[0]
            if family not in best or r["forward_ms"] < best[family]["forward_ms"]:
                best[family] = r
        dense = [min(v for v in (r.get("dense_cudnn_ms"), r.get("dense_flash_ms")) if isinstance(v, (int, float)))
                 for r in at if any(isinstance(v, (int, float)) for v in (r.get("dense_cudnn_ms"),
                                                                          r.get("dense_flash_ms")))]
        parts = [f"{fam}-level `{r['label']}` {_fmt(r['forward_ms'])} ms forward ({_fmt(r.get('fwd_bwd_ms'))} ms "
                 f"fwd+bwd)" for fam, r in sorted(best.items())]
        dense_ms = sorted(dense)[len(dense) // 2] if dense else None
        line = (f"- **Speed, T={T}** ({at[0].get('device')}, {regime} inputs): fastest " + "; ".join(parts)
                + (f"; dense attention (best SDPA backend, median over the run) {_fmt(dense_ms)} ms forward." if dense_ms else "."))
        if dense_ms and all(r["forward_ms"] > dense_ms for r in at):
            line += (" No variant beats dense attention at this size: with this sweep's few heads and short rows "
                     "the sparse kernels' fixed costs (pooling, scoring, top-k) outweigh the attention they save.")
        lines.append(line)
    return lines + ([""] if lines else [])


def _headline(sweep_axes: list[str], fid: list[dict]) -> list[str]:
    """Per regime x seqlen (x budget): the best variant by recall and, when granularity varies, the best of each."""
    lines = []
    ok = [r for r in fid if r["status"] == "ok" and r.get("recall") is not None]
    budget_key = "axis:budget.tokens"
    for regime, T in sorted({(r["regime"], r["seqlen"]) for r in ok}):
        rows = [r for r in ok if r["regime"] == regime and r["seqlen"] == T]
        for budget in sorted({r.get(budget_key) for r in rows}, key=lambda b: (b is None, b)):
            sub = [r for r in rows if r.get(budget_key) == budget]
            best = max(sub, key=lambda r: r["recall"])
            where = f"{regime}, T={T}" + (f", budget {budget} tokens" if budget is not None else "")
            parts = []
            if "selection.granularity" in sweep_axes:
                for gran in ("block", "token"):
                    g = [r for r in sub if r.get("axis:selection.granularity") == gran]
                    if g:
                        b = max(g, key=lambda r: r["recall"])
                        text = (f"best {gran}-level `{b['label']}`: recall {_fmt(b['recall'])} (oracle "
                                f"{_fmt(b['recall_oracle'])}), gated error {_fmt(b['err_gated'])}")
                        if b.get("needle_hit") is not None:
                            text += f", needle hit {_fmt(b['needle_hit'], 2)}"
                        if b.get("recall_unfitted") is not None:
                            text += f" ({b['scorer']}; with random weights: recall {_fmt(b['recall_unfitted'])}"
                            if b.get("needle_hit_unfitted") is not None:
                                text += f", needle hit {_fmt(b['needle_hit_unfitted'], 2)}"
                            text += ")"
                        parts.append(text)
            else:
                parts.append(f"best `{best['label']}`: recall {_fmt(best['recall'])}, gated error "
                             f"{_fmt(best['err_gated'])}")
            lines.append(f"- **{where}**: " + "; ".join(parts) + ".")
    verdict = _granularity_verdict(ok)
    if verdict:
        lines += ["", "Granularity at equal budget (computed from the rows above):", ""] + verdict
    return lines


def _granularity_verdict(ok: list[dict]) -> list[str]:
    """When both granularities were measured: does the best block-level variant reach the token-level one at the same
    budget, could any block scorer (its oracle), and what budget does the block level need to match it."""
    gran, budget = "axis:selection.granularity", "axis:budget.tokens"
    if not any(r.get(gran) == "token" for r in ok) or not any(r.get(gran) == "block" for r in ok):
        return []
    lines = []
    for regime, T in sorted({(r["regime"], r["seqlen"]) for r in ok}):
        rows = [r for r in ok if r["regime"] == regime and r["seqlen"] == T]
        for b in sorted({r.get(budget) for r in rows}, key=lambda b: (b is None, b)):
            tok = [r for r in rows if r.get(gran) == "token" and r.get(budget) == b]
            blk = [r for r in rows if r.get(gran) == "block" and r.get(budget) == b]
            if not tok or not blk:
                continue
            t = max(tok, key=lambda r: r["recall"])
            k = max(blk, key=lambda r: r["recall"])
            o = max(blk, key=lambda r: r["recall_oracle"])
            where = f"{regime}, T={T}" + (f", {b} tokens" if b is not None else "")
            if k["recall"] >= t["recall"]:
                text = f"block-level `{k['label']}` catches up ({_fmt(k['recall'])} vs {_fmt(t['recall'])})"
            elif o["recall_oracle"] < t["recall"]:
                text = (f"no: `{t['label']}` recalls {_fmt(t['recall'])}, above even the oracle ceiling of every "
                        f"block size (best `{o['label']}`: {_fmt(o['recall_oracle'])}; its scorer reaches "
                        f"{_fmt(o['recall'])})")
            else:
                text = (f"not with its scorer: `{k['label']}` {_fmt(k['recall'])} vs `{t['label']}` "
                        f"{_fmt(t['recall'])}, though a perfect block scorer could ({_fmt(o['recall_oracle'])})")
            bigger = sorted((r for r in rows if r.get(gran) == "block" and b is not None and r.get(budget) is not None
                             and r[budget] > b and r["recall"] >= t["recall"]), key=lambda r: (r[budget], -r["recall"]))
            if bigger:
                text += (f"; block level matches it at {bigger[0][budget]} tokens "
                         f"(`{bigger[0]['label']}`: {_fmt(bigger[0]['recall'])})")
            lines.append(f"- {where}: {text}.")
    return lines


def write_report(out_dir: Path, *, sweep=None, points: list | None = None, plot_format: str = "png") -> dict:
    """Write results.csv, results.json, report.md and plots/ from results.jsonl and the points (from the sweep, or
    points.json written by the last run)."""

    out_dir = Path(out_dir)
    if points is None:
        pts = json.loads((out_dir / "points.json").read_text(encoding="utf-8"))
    else:
        pts = [p.summary() if hasattr(p, "summary") else p for p in points]
    records = read_records(out_dir / "results.jsonl")
    fid = fidelity_rows(pts, records)
    spd = speed_rows(pts, records)
    other = [{"index": p["index"], "label": p["label"], "status": p["status"], "reason": p["reason"],
              **{f"axis:{k}": v for k, v in p["effective"].items()}} for p in pts if p["status"] != "valid"]
    write_csv(out_dir / "results.csv", [{"part": "fidelity", **r} for r in fid] + [{"part": "speed", **r} for r in spd]
              + [{"part": "point", **r} for r in other])
    name = sweep.name if sweep is not None else (pts[0]["spec_name"] or "sweep").rsplit("_", 1)[0] if pts else "sweep"
    (out_dir / "results.json").write_text(json.dumps(
        {"sweep": name, "question": getattr(sweep, "question", ""), "points": pts, "fidelity": fid, "speed": spd},
        indent=1, default=str) + "\n", encoding="utf-8")
    axes = list(pts[0]["effective"]) if pts else []
    plots = write_plots(out_dir, fid, spd, axes, plot_format)
    (out_dir / "report.md").write_text(_markdown(sweep, name, pts, fid, spd, records, plots, axes), encoding="utf-8")
    return {"report": out_dir / "report.md", "csv": out_dir / "results.csv", "json": out_dir / "results.json",
            "plots": [out_dir / p for p in plots]}


def _markdown(sweep, name: str, pts: list[dict], fid: list[dict], spd: list[dict], records: list[dict],
              plots: list[str], axes: list[str]) -> str:
    counts = {s: sum(p["status"] == s for p in pts) for s in ("valid", "invalid", "duplicate")}
    # Provenance of the rows shown: records of an earlier revision of a variant (another spec hash) are kept in
    # results.jsonl but are not this report's.
    current = {p.get("spec_hash") for p in pts if p.get("status") == "valid"}
    shown = [r for r in records if r.get("spec_hash") in current]
    devices = sorted({r.get("device") for r in shown if r.get("status") == "ok" and r.get("device")})
    commits = sorted({r.get("commit") for r in shown if r.get("commit")})
    out = [f"# Sweep `{name}`", ""]
    if sweep is not None and sweep.question:
        out += [f"> {sweep.question}", ""]
    src = f"`specgen sweep {sweep.path}`" if sweep is not None and sweep.path else "`specgen sweep`"
    out += [f"Generated by {src} on {time.strftime('%Y-%m-%d')} from `results.jsonl` (commit(s) "
            f"{', '.join(commits) or 'unknown'}; measured on {', '.join(devices) or '-'}). "
            f"{len(pts)} grid points: {counts['valid']} valid variants, {counts['invalid']} rejected by the spec "
            f"model, {counts['duplicate']} duplicates of another point. {len(fid)} fidelity measurements, "
            f"{sum(r['status'] == 'ok' for r in spd)} speed measurements.", ""]
    out += ["## Headline", ""]
    head = _headline(axes, fid)
    out += head or ["No fidelity results yet."]
    out += [""]
    ok_speed = [r for r in spd if r["status"] == "ok"]
    out += _speed_headline(ok_speed)
    if not ok_speed:
        out += ["Speed: **not measured: no GPU** (timings under the CPU interpreter mean nothing). Run the same "
                "command with `--device cuda` on a GPU machine: finished fidelity rows are kept and the speed "
                "columns are added. The Pareto plot uses the forward FLOPs of `specgen.compile.analysis` as the cost "
                "until then.", ""]
    out += ["## How this was measured", "",
            "- **Fidelity** uses the float64 reference (`specgen.reference.nsa_forward`), whose selections the "
            "kernels reproduce up to near-ties, against dense causal attention on the same q/k/v (every branch reads "
            "the same k/v). Inputs are synthetic with long-range structure (`specgen.study.fidelity`): *structured* = sink "
            "+ local (RoPE-like) attention + a few distant hits (runs of keys on a topic a query looks for); "
            "*retrieval* = the same background with needles: a key in [T/8, T/2) that one probe query in "
            "[3T/4, T) must find; *random* = i.i.d. N(0, 1). Train and eval inputs are different draws of the "
            "same synthetic \"model\".",
            "- Metrics are over queries t >= eval_from (default T/2). **recall**: the fraction of each query's dense "
            "softmax mass (averaged over the kv group's heads) inside the selected tokens, mean over (b, t, group); "
            "p10 is its 10th percentile; **oracle**: the recall of the best selection of the same unit size, top_k "
            "and forced blocks (the ceiling for any scorer); **cover_union**: mass inside selection or window; "
            "**err_selection**: relative error of the selection branch alone vs dense; **err_gated**: of the "
            "branches mixed by mass gates (softmax of the branch log-sum-exps: attention over the branches as one "
            "softmax; random gates would make the number meaningless); **needle hit**: fraction of probes whose "
            "needle token is selected.",
            "- **Fitting** (docs/marks.md: selectors must be trained to be compared): an indexer's q_idx/k_idx/w_idx "
            "are a linear map of the main q and k, fitted by Adam on the dense-stage distillation loss (KL to the "
            "group-mean dense attention, equal to `reference.distill_loss`) over fresh training draws, then "
            "evaluated on the eval split; the unfitted columns are the same map with its random initial weights. A "
            "linear pool is fitted to the dense output through the compression branch. The compression scorer with "
            "mean pooling has no parameters.",
            "- **MFLOP fwd**: the variant's whole forward at that T from `specgen.compile.analysis` (matmuls and pooling; it "
            "includes the indexer's scoring of every past token, which an equal *selection* budget leaves out).", ""]
    fitted = [r for r in fid if r.get("distill_eval_fitted") is not None]
    if fitted:
        out += ["Fitted scorers (distillation loss on the eval split, float64 `reference.distill_loss`):", ""]
        rows = [[r["label"], r["regime"], str(r["seqlen"]), _fmt(r["distill_eval_unfitted"]),
                 _fmt(r["distill_eval_fitted"])] for r in fitted]
        out += [_md_table(["variant", "regime", "T", "KL random weights", "KL fitted"], rows), ""]
        details = next((d for rec in records for d in (rec.get("fit") or {}).get("details", [])), None)
        if details:
            out += [f"Recipe: {details['how']}.", ""]
    for regime, T in sorted({(r["regime"], r["seqlen"]) for r in fid}):
        rows = [r for r in fid if r["regime"] == regime and r["seqlen"] == T]
        out += [f"## Fidelity: {regime}, T = {T}", ""]
        needle = any(r.get("needle_hit") is not None for r in rows)
        unf = any(r.get("recall_unfitted") is not None for r in rows)
        header = ["variant", "axes", "top_k", "scorer", "recall", "p10", "oracle", "cover union", "err sel",
                  "err gated", "MFLOP fwd"]
        if needle:
            header[8:8] = ["needle hit", "oracle hit"]
        if unf:
            header += ["recall (random w)"] + (["needle (random w)"] if needle else [])
        body = []
        for r in sorted(rows, key=lambda r: -(r.get("recall") or -1)):
            if r["status"] != "ok":
                body.append([r["label"], "", "", "", f"error: {r['error'][:80]}"] + [""] * (len(header) - 5))
                continue
            axes_of = {k[5:]: v for k, v in r.items() if k.startswith("axis:")}
            line = [r["label"] + (" (build failed)" if r.get("build_error") else ""), _axes_text(axes_of),
                    _fmt(r["top_k"]), r["scorer"], _fmt(r["recall"]), _fmt(r["recall_p10"]),
                    _fmt(r["recall_oracle"]), _fmt(r["cover_union"])]
            if needle:
                line += [_fmt(r["needle_hit"], 2), _fmt(r["needle_hit_oracle"], 2)]
            line += [_fmt(r["err_selection"]), _fmt(r["err_gated"]),
                     f"{r['forward_gflop'] * 1e3:.1f}" if r.get("forward_gflop") else ""]
            if unf:
                line += [_fmt(r["recall_unfitted"])] + ([_fmt(r["needle_hit_unfitted"], 2)] if needle else [])
            body.append(line)
        out += [_md_table(header, body), ""]
    out += ["## Speed", ""]
    if ok_speed:
        body = [[r["label"], r["regime"], str(r["seqlen"]), r.get("device") or "", _fmt(r.get("forward_ms")),
                 _fmt(r.get("forward_tflops"), 1), _fmt(r.get("fwd_bwd_ms")), _fmt(r.get("dense_cudnn_ms")),
                 _fmt(r.get("dense_flash_ms")), _fmt(r.get("dense_fwd_bwd_ms")),
                 _fmt(r.get("speedup_vs_best_dense"), 2)] for r in ok_speed]
        out += [_md_table(["variant", "regime", "T", "device", "fwd ms", "TFLOP/s", "fwd+bwd ms", "dense cuDNN fwd",
                           "dense flash fwd", "best dense fwd+bwd", "speedup vs best dense fwd"], body), "",
                "Medians of `triton.testing.do_bench`; dense SDPA measured in the same run (specgen.perf.bench).", ""]
    else:
        out += ["no GPU: speed not measured (see above).", ""]
    bad = [p for p in pts if p["status"] != "valid"]
    if bad:
        out += ["## Points not measured", ""]
        out += [_md_table(["#", "point", "axes", "status", "reason"],
                          [[str(p["index"]), p["label"], _axes_text(p["values"]), p["status"], p["reason"]]
                           for p in bad]), ""]
    noted = [p for p in pts if p.get("notes") and p["status"] == "valid"]
    if noted:
        out += ["Notes on measured points: " + "; ".join(f"`{p['label']}`: {', '.join(p['notes'])}"
                                                          for p in noted), ""]
    if plots:
        out += ["## Plots", ""] + [f"![{Path(p).stem}]({p})" for p in plots] + [""]
    else:
        out += ["## Plots", "", "Not drawn: matplotlib is not installed (`pip install matplotlib`).", ""]
    return "\n".join(out)


__all__ = ["fidelity_rows", "speed_rows", "write_csv", "write_plots", "write_report"]
