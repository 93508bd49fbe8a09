"""A sweep's results as tables (CSV, JSON), a Markdown report and plots.

Reads `<out>/results.jsonl` (the latest record per key wins; with the sweep at hand, only records whose key carries
the sweep's current settings) and the sweep's points, and writes results.csv, results.json, report.md and plots/
(matplotlib when installed; without it the report says so and has no plots). The conclusions follow
`specgen.study.conclusions`, the plots `specgen.study.plots`, the roofline flag `specgen.study.roofline`.
"""

from __future__ import annotations

import csv
import json
import math
import re
import time
from pathlib import Path
from typing import Any

FIDELITY_COLUMNS = ("recall", "recall_p10", "recall_oracle", "cover_window", "cover_union", "cover_compression",
                    "err_selection", "err_gated", "err_compression", "err_window", "needle_hit", "needle_hit_oracle",
                    "needle_mass", "needle_err_selection", "selected_tokens", "recall_by_kv_head")
SPREAD_COLUMNS = ("recall", "recall_p10", "recall_oracle", "err_gated", "needle_hit")
ALL_LAYERS = " (all layers)"
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


def _fit_summary(rec: dict) -> dict:
    """The fit of one record over its seeds: held-out loss of random weights, held-out and training loss of the fit
    (means; sd of the held-out one), and the check."""
    details = (rec.get("fit") or {}).get("details") or []
    out: dict[str, Any] = {}
    for what, prefix in (("indexer", "distill"), ("linear pool", "pool")):
        logs = [d for d in details if d.get("what") == what]
        if not logs:
            continue
        for src, dst in (("eval_loss_unfitted", "random"), ("eval_loss_fitted", "fitted"),
                         ("train_loss_last", "train_last")):
            vals = [d[src] for d in logs if isinstance(d.get(src), (int, float))]
            if vals:
                out[f"{prefix}_{dst}"] = sum(vals) / len(vals)
                if dst == "fitted" and len(vals) > 1:
                    mu = out[f"{prefix}_{dst}"]
                    out[f"{prefix}_fitted_sd"] = math.sqrt(sum((v - mu) ** 2 for v in vals) / (len(vals) - 1))
        out[f"{prefix}_how"] = logs[0].get("how")
    check = rec.get("fit_check")
    out["fit_ok"] = True if check is None else bool(check.get("ok"))
    out["fit_reason"] = "" if check is None else check.get("reason", "")
    return out


def _budget_of(p: dict) -> tuple[int | None, int | None, str, str]:
    """(budget axis value or None, selected tokens, granularity, series name) of a point."""
    spec = p.get("spec") or {}
    sel = spec.get("selection") or {}
    gran = sel.get("granularity", "block")
    unit = 1 if gran == "token" else sel.get("block") or 1
    tokens = (sel.get("top_k") or 0) * unit or None
    budget = p["effective"].get("budget.tokens")
    series = re.sub(r"_b\d+$", "", p["label"]) if budget is not None else p["label"]
    return budget, tokens, gran, series


def _layer_of(regime: str) -> tuple[str, int | None]:
    if regime.startswith("file:") and "#layer=" in regime:
        base, _, layer = regime.rpartition("#layer=")
        return base, int(layer)
    return regime, None


def fidelity_rows(points: list[dict], records: list[dict], keys: set[str] | None = None) -> list[dict]:
    """One row per measured (variant, regime, seqlen), in point order, each a mean over the seeds with `<metric>_sd`
    beside it; captured models add one row per variant over all layers (`<file> (all layers)`: per seed the mean
    over layers, then mean and sd over seeds). `keys`: only records with these keys (the sweep's current settings)."""
    by_hash = {p["spec_hash"]: p for p in points if p["status"] == "valid"}
    rows = []
    flop_cache: dict[tuple, float | None] = {}
    for r in _latest(records).values():
        if r.get("part") != "fidelity" or r.get("spec_hash") not in by_hash:
            continue
        if keys is not None and r.get("key") not in keys:
            continue
        p = by_hash[r["spec_hash"]]
        row: dict[str, Any] = {"index": p["index"], "label": p["label"], "spec_name": r.get("spec_name"),
                               "spec_hash": r["spec_hash"], "status": r.get("status")}
        row.update({f"axis:{k}": v for k, v in p["effective"].items()})
        budget, tokens, gran, series = _budget_of(p)
        base, layer = _layer_of(r["regime"])
        row.update({"top_k": p["top_k"], "regime": r["regime"], "layer": layer, "seqlen": r["seqlen"],
                    "scorer": r.get("scorer", ""), "budget": budget, "tokens": tokens, "granularity": gran,
                    "series": series, "seeds": r.get("seeds", 1)})
        m = r.get("metrics") or {}
        sd = r.get("metrics_sd") or {}
        row.update({c: m.get(c) for c in FIDELITY_COLUMNS})
        row.update({f"{c}_sd": sd.get(c) for c in SPREAD_COLUMNS})
        unf = r.get("unfitted") or {}
        row.update({f"{c}_unfitted": unf.get(c) for c in UNFITTED_COLUMNS})
        row.update(_fit_summary(r))
        key = (r["spec_hash"], r["seqlen"])
        if key not in flop_cache:
            flop_cache[key] = _flops(p.get("spec"), r["seqlen"])
        row["forward_gflop"] = flop_cache[key] / 1e9 if flop_cache[key] else None
        row.update({"seconds": r.get("seconds"), "device": r.get("device"), "date": r.get("date"),
                    "commit": r.get("commit"), "error": r.get("error", ""), "build_error": r.get("build_error", "")})
        row["_per_seed"] = r.get("per_seed") or ([m] if m else [])
        row["_base"] = base
        rows.append(row)
    rows += _all_layers(rows)
    rows.sort(key=lambda x: (x["regime"], x["seqlen"], x["index"]))
    return rows


def _all_layers(rows: list[dict]) -> list[dict]:
    """Per variant and capture file with every layer measured: the mean over layers, seed by seed."""
    out = []
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        if r.get("layer") is not None:
            groups.setdefault((r["_base"], r["spec_hash"]), []).append(r)
    for (base, _), layers in groups.items():
        if any(r["status"] != "ok" for r in layers):
            continue
        seeds = min(len(r["_per_seed"]) for r in layers)
        if seeds == 0:
            continue
        row = {k: v for k, v in layers[0].items() if not k.startswith("_")}
        row.update({"regime": base + ALL_LAYERS, "layer": "all", "seeds": seeds,
                    "fit_ok": all(r.get("fit_ok", True) for r in layers),
                    "fit_reason": "; ".join(f"layer {r['layer']}: {r['fit_reason']}" for r in layers
                                            if r.get("fit_reason")),
                    "seconds": sum(r.get("seconds") or 0 for r in layers)})
        for c in FIDELITY_COLUMNS:
            if c == "recall_by_kv_head":
                row[c] = None
                continue
            per = []
            for i in range(seeds):
                vals = [r["_per_seed"][i].get(c) for r in layers]
                if all(isinstance(v, (int, float)) for v in vals):
                    per.append(sum(vals) / len(vals))
            row[c] = sum(per) / len(per) if len(per) == seeds else None
            if c in SPREAD_COLUMNS:
                row[f"{c}_sd"] = (math.sqrt(sum((v - row[c]) ** 2 for v in per) / (seeds - 1))
                                  if row[c] is not None and seeds > 1 else (0.0 if row[c] is not None else None))
        for c in [k for k in row if k.endswith("_unfitted") or k.startswith(("distill_", "pool_"))]:
            vals = [r.get(c) for r in layers]
            row[c] = sum(vals) / len(vals) if all(isinstance(v, (int, float)) for v in vals) else row.get(c)
        out.append(row)
    return out


def speed_rows(points: list[dict], records: list[dict], prefixes: set[str] | None = None,
               min_roofline: float | None = None) -> list[dict]:
    """One row per timed (variant, regime, seqlen, device). `prefixes`: the sweep's current speed keys without the
    device; a record of the same variant, regime and length written before keys carried settings (no `settings`)
    is shown too, marked `legacy` (its fit settings were not recorded). Each timed row gets its roofline fraction
    and `flagged` when below `min_roofline` (specgen.study.roofline)."""
    from .roofline import DEFAULT_MIN_FRACTION, of_spec

    min_roofline = DEFAULT_MIN_FRACTION if min_roofline is None else min_roofline
    by_hash = {p["spec_hash"]: p for p in points if p["status"] == "valid"}
    current = {}
    for r in _latest(records).values():
        if r.get("part") != "speed" or r.get("spec_hash") not in by_hash:
            continue
        legacy = "settings" not in r
        if prefixes is not None and not legacy and r.get("key", "").rsplit("|", 1)[0] not in prefixes \
                and r.get("key") not in prefixes:
            continue
        ident = (r["spec_hash"], r["regime"], r["seqlen"], r.get("device"))
        if legacy and ident in current and not current[ident][1]:
            continue                                       # a current record beats a legacy one
        current[ident] = (r, legacy)
    rows = []
    for r, legacy in current.values():
        p = by_hash[r["spec_hash"]]
        s = r.get("speed")
        row = {"index": p["index"], "label": p["label"], "spec_hash": r["spec_hash"], "status": r.get("status"),
               "regime": r["regime"], "seqlen": r["seqlen"], "device": r.get("device"), "legacy": legacy}
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
            if isinstance(s.get("forward_ms"), (int, float)) and s["forward_ms"] > 0:
                try:
                    row.update(of_spec(p["spec"], r["seqlen"], s["forward_ms"], s, min_roofline))
                except Exception as exc:          # an analysis failure must not hide the timing
                    row["roofline_error"] = f"{type(exc).__name__}: {exc}"
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


def _cost_rows(fid: list[dict], spd: list[dict]) -> list[dict]:
    """Fidelity rows with the cost to plot against: the forward time measured at the same length (the structured
    regime's when timed, else any), else the analysis FLOPs at that length."""
    timed: dict[tuple, dict] = {}
    for s in spd:
        if s.get("status") == "ok" and isinstance(s.get("forward_ms"), (int, float)):
            key = (s["spec_hash"], s["seqlen"])
            if key not in timed or s["regime"] == "structured":
                timed[key] = s
    out = []
    for r in fid:
        if r["status"] != "ok" or r.get("recall") is None:
            continue
        panel = [x for x in fid if x["regime"] == r["regime"] and x["seqlen"] == r["seqlen"]]
        use_ms = all((x["spec_hash"], x["seqlen"]) in timed for x in panel)
        s = timed.get((r["spec_hash"], r["seqlen"])) if use_ms else None
        out.append({**r, "cost": s["forward_ms"] if s else ((r.get("forward_gflop") or 0.0) * 1e3 or None),
                    "cost_kind": "ms" if s else "mflop", "flagged": bool(s and s.get("flagged"))})
    return out


def write_plots(out_dir: Path, fid: list[dict], spd: list[dict], axes: list[str] | None = None,
                fmt: str = "png") -> list[str]:
    """plots/recall_budget and plots/recall_time (specgen.study.plots); [] when matplotlib is missing."""
    from . import plots

    if not plots.available():
        return []
    ok = [r for r in fid if r["status"] == "ok" and r.get("recall") is not None and r.get("tokens")]
    if not ok:
        return []
    folder = out_dir / "plots"
    folder.mkdir(exist_ok=True)
    for stale in ("pareto", "axes"):                     # the plots earlier versions drew
        (folder / f"{stale}.{fmt}").unlink(missing_ok=True)
    import matplotlib.pyplot as plt

    made = []
    fig = plots.recall_budget(ok)
    fig.savefig(folder / f"recall_budget.{fmt}", dpi=110)
    plt.close(fig)
    made.append(f"plots/recall_budget.{fmt}")
    fig, _ = plots.recall_time(_cost_rows(ok, spd))
    fig.savefig(folder / f"recall_time.{fmt}", dpi=110)
    plt.close(fig)
    made.append(f"plots/recall_time.{fmt}")
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
        slow = [r for r in at if r.get("flagged")]
        if slow:
            line += (" **Kernel below its roofline fraction** (its time reflects an unoptimised code path at this "
                     "shape, not the variant): " + ", ".join(f"`{r['label']}` {100 * r['roofline_fraction']:.0f}%"
                                                             for r in slow) + ".")
        lines.append(line)
    return lines + ([""] if lines else [])


def _headline(sweep_axes: list[str], fid: list[dict]) -> list[str]:
    """Conclusions per regime x seqlen x budget (specgen.study.conclusions)."""
    from .conclusions import headline

    rows = [r for r in fid if r["status"] == "ok" and r.get("recall") is not None]
    return headline(rows, "selection.granularity" in sweep_axes)


def write_report(out_dir: Path, *, sweep=None, points: list | None = None, plot_format: str = "png",
                 keys: tuple[set[str], set[str]] | None = None) -> dict:
    """Write results.csv, results.json, report.md and plots/ from results.jsonl and the points (from the sweep, or
    points.json written by the last run). `keys`: (fidelity keys, speed keys without the device) of the sweep's
    current settings (`sweep.current_keys`): only their records are reported; without them, the latest record of
    each key."""

    out_dir = Path(out_dir)
    if points is None:
        pts = json.loads((out_dir / "points.json").read_text(encoding="utf-8"))
    else:
        pts = [p.summary() if hasattr(p, "summary") else p for p in points]
    records = read_records(out_dir / "results.jsonl")
    fid_keys, speed_keys = keys if keys is not None else (None, None)
    fid = fidelity_rows(pts, records, fid_keys)
    min_roofline = sweep.speed.get("min_roofline") if sweep is not None else None
    spd = speed_rows(pts, records, speed_keys, min_roofline)
    other = [{"index": p["index"], "label": p["label"], "status": p["status"], "reason": p["reason"],
              **{f"axis:{k}": v for k, v in p["effective"].items()}} for p in pts if p["status"] != "valid"]
    public = [{k: v for k, v in r.items() if not k.startswith("_")} for r in fid]
    write_csv(out_dir / "results.csv", [{"part": "fidelity", **r} for r in public]
              + [{"part": "speed", **r} for r in spd] + [{"part": "point", **r} for r in other])
    name = sweep.name if sweep is not None else (pts[0]["spec_name"] or "sweep").rsplit("_", 1)[0] if pts else "sweep"
    (out_dir / "results.json").write_text(json.dumps(
        {"sweep": name, "question": getattr(sweep, "question", ""), "points": pts, "fidelity": public,
         "speed": spd}, indent=1, default=str) + "\n", encoding="utf-8")
    axes = list(pts[0]["effective"]) if pts else []
    plots = write_plots(out_dir, fid, spd, axes, plot_format)
    used = {r.get("key") for r in records} if fid_keys is None else (fid_keys | {
        r.get("key") for r in records if r.get("part") == "speed"})
    stale = sum(1 for r in records if r.get("part") == "fidelity" and fid_keys is not None
                and r.get("key") not in fid_keys)
    (out_dir / "report.md").write_text(_markdown(sweep, name, pts, fid, spd, [r for r in records
                                                                              if r.get("key") in used],
                                                 plots, axes, stale), encoding="utf-8")
    return {"report": out_dir / "report.md", "csv": out_dir / "results.csv", "json": out_dir / "results.json",
            "plots": [out_dir / p for p in plots]}


RULES = ("Conclusions compare variants only within one regime, one length and one budget. Each number is the mean "
         "over the seeds (repeats with new training and eval draws and a new fit) ± their standard deviation; a "
         "difference counts only beyond 2 standard deviations of the difference (2·√(σa² + σb²)), otherwise it is "
         "**undecided**. Rows whose fit failed (held-out loss not ≥ {gain:.0f}% below random weights') are left out "
         "and named. The oracle ceiling is the recall of the best selection of any measured shape in the group.")


def _fit_table(fid: list[dict], gain: float) -> list[str]:
    rows = [r for r in fid if r.get("distill_fitted") is not None or r.get("pool_fitted") is not None]
    if not rows:
        return []
    out = ["## Fitted scorers", "",
           "Held-out loss of random weights, of the fit (mean ± sd over seeds) and the fit's last training loss "
           "(indexer: the distillation KL, float64 `reference.distill_loss` on the eval split; linear pool: the "
           "compression branch's relative MSE). A fit fails unless its held-out loss is at least "
           f"{gain:.0f}% below random weights'.", ""]
    body = []
    for r in rows:
        for prefix, what in (("distill", "indexer"), ("pool", "linear pool")):
            if r.get(f"{prefix}_fitted") is None:
                continue
            sd = r.get(f"{prefix}_fitted_sd")
            body.append([r["label"], r["regime"], str(r["seqlen"]), what, str(r.get("seeds", 1)),
                         _fmt(r.get(f"{prefix}_random")), _fmt(r.get(f"{prefix}_fitted")) +
                         (f" ± {_fmt(sd)}" if sd is not None else ""), _fmt(r.get(f"{prefix}_train_last")),
                         "ok" if r.get("fit_ok", True) else f"**failed**: {r.get('fit_reason', '')}"])
    out += [_md_table(["variant", "regime", "T", "scorer", "seeds", "held-out, random weights",
                       "held-out, fitted", "train (last step)", "check"], body), ""]
    how = next((r.get("distill_how") or r.get("pool_how") for r in rows if r.get("distill_how") or
                r.get("pool_how")), None)
    if how:
        out += [f"Recipe: {how}.", ""]
    return out


def _markdown(sweep, name: str, pts: list[dict], fid: list[dict], spd: list[dict], records: list[dict],
              plots: list[str], axes: list[str], stale: int = 0) -> str:
    from .conclusions import pm

    counts = {s: sum(p["status"] == s for p in pts) for s in ("valid", "invalid", "duplicate")}
    current = {p.get("spec_hash") for p in pts if p.get("status") == "valid"}
    shown = [r for r in records if r.get("spec_hash") in current]
    devices = sorted({r.get("device") for r in shown if r.get("status") == "ok" and r.get("device")})
    commits = sorted({r.get("commit") for r in shown if r.get("commit")})
    seeds = sorted({r.get("seeds", 1) for r in fid if r["status"] == "ok"})
    out = [f"# Sweep `{name}`", ""]
    if sweep is not None and sweep.question:
        out += [f"> {sweep.question}", ""]
    if sweep is not None and sweep.description:
        out += [sweep.description, ""]
    src = f"`specgen sweep {sweep.path}`" if sweep is not None and sweep.path else "`specgen sweep`"
    measured = [r for r in fid if r.get("layer") != "all"]
    out += [f"Generated by {src} on {time.strftime('%Y-%m-%d')} from `results.jsonl` (commit(s) "
            f"{', '.join(commits) or 'unknown'}; measured on {', '.join(devices) or '-'}). "
            f"{len(pts)} grid points: {counts['valid']} valid variants, {counts['invalid']} rejected by the spec "
            f"model, {counts['duplicate']} duplicates of another point. {len(measured)} fidelity measurements "
            f"(each over {'/'.join(map(str, seeds)) or '-'} seeds), {sum(r['status'] == 'ok' for r in spd)} speed "
            f"measurements." + (f" {stale} fidelity records measured with other settings (an earlier fit recipe, "
                                f"seeds or capture) stay in `results.jsonl` and are not shown." if stale else ""), ""]
    gain = 100 * (sweep.fidelity.get("min_fit_gain", 0.1) if sweep is not None else 0.1)
    out += ["## Headline", "", RULES.format(gain=gain), ""]
    head = _headline(axes, fid)
    out += head or ["No fidelity results yet."]
    failed = [r for r in fid if r["status"] == "ok" and not r.get("fit_ok", True) and r.get("layer") != "all"]
    if failed:
        out += ["", f"**{len(failed)} fit(s) failed** and are left out of the conclusions above: "
                + "; ".join(f"`{r['label']}` ({r['regime']}, T={r['seqlen']}): {r['fit_reason']}" for r in failed)
                + ". More `fit_steps`, another `fit_lr` or more training data (`train_batch`, `train_T`) may fix "
                  "them; the table of fitted scorers below has the losses."]
    out += [""]
    ok_speed = [r for r in spd if r["status"] == "ok"]
    out += _speed_headline(ok_speed)
    if not ok_speed:
        out += ["Speed: **not measured: no GPU** (timings under the CPU interpreter mean nothing). Run the same "
                "command with `--device cuda` on a GPU machine: finished fidelity rows are kept and the speed "
                "columns are added. The recall-vs-cost plot uses the forward FLOPs of `specgen.compile.analysis` until then.",
                ""]
    files = sorted({r["_base"] for r in fid if r["regime"].startswith("file:") and r.get("layer") != "all"})
    out += ["## How this was measured", "",
            "- **Fidelity** uses the float64 reference (`specgen.reference.nsa_forward`), whose selections the "
            "kernels reproduce up to near-ties, against dense causal attention on the same q/k/v (every branch reads "
            "the same k/v)." + (" Synthetic inputs (`specgen.study.fidelity`): *structured* = sink + local (RoPE-like) "
                                "attention + a few distant hits (runs of keys on a topic a query looks for); "
                                "*retrieval* = the same background with needles: a key in [T/8, T/2) that one probe "
                                "query in [3T/4, T) must find; *random* = i.i.d. N(0, 1). Train and eval inputs are "
                                "different draws of the same synthetic \"model\"; each seed draws new ones."
                                if any(not r["regime"].startswith("file:") for r in fid) else ""),
            ]
    if files:
        metas = []
        for f in files:
            try:
                from .capture_format import load, parse_regime

                base = sweep.base_dir if sweep is not None else None
                layer = next((x["layer"] for x in fid if x["regime"].startswith(f + "#")
                              and isinstance(x.get("layer"), int)), None)
                c = load(parse_regime(f)[0], layer, base)
                metas.append(f"`{f}`: {c.meta.get('model', '?')}, {c.q.shape[0]} sequences of T={c.q.shape[1]}, "
                             f"tokens: {c.meta.get('tokens', '?')}, text: {c.meta.get('text', '?')}")
            except Exception as exc:
                metas.append(f"`{f}`: (not readable now: {exc})")
        out += ["- **Captured activations** (`specgen capture`): q and k after the model's RoPE, v, and the "
                "attention module's input (hidden states) per layer; the first half of the sequences trains the "
                "scorers, the rest is evaluated; each layer is fitted and measured on its own (`#layer=N` rows), and "
                "`(all layers)` rows average the layers seed by seed. A capture has one eval split, so its repeats "
                "differ in the fit only: parameter-free rows have no spread, and the margins do not include the "
                "variation between texts. " + "; ".join(metas) + "."]
    out += ["- Metrics are over queries t >= eval_from (default T/2). **recall**: the fraction of each query's dense "
            "softmax mass (averaged over the kv group's heads) inside the selected tokens, mean over (b, t, group); "
            "p10 is its 10th percentile; **oracle**: the recall of the best selection of the same unit size, top_k "
            "and forced blocks (the ceiling for any scorer); **cover_union**: mass inside selection or window; "
            "**err_gated**: relative error of the branches mixed by mass gates (softmax of the branch "
            "log-sum-exps); **needle hit**: fraction of probes whose needle token is selected. ± is the standard "
            "deviation over seeds.",
            "- **Fitting** (docs/marks.md: selectors must be trained to be compared): an indexer's q_idx/k_idx/w_idx "
            "are a linear map of the main q and k (of the hidden states when a capture has them), fitted by Adam on "
            "the dense-stage distillation loss (KL to the group-mean dense attention, equal to "
            "`reference.distill_loss`) over training draws, then evaluated on the eval split; the *random w* "
            "columns are the same map with its random initial weights. A linear pool is fitted to the dense output "
            "through the compression branch. The compression scorer with mean pooling has no parameters.",
            "- **MFLOP fwd**: the variant's whole forward at that T from `specgen.compile.analysis` (it includes the "
            "indexer's scoring of every past token, which an equal *selection* budget leaves out).", ""]
    out += _fit_table(fid, gain)
    for regime, T in sorted({(r["regime"], r["seqlen"]) for r in fid}):
        rows = [r for r in fid if r["regime"] == regime and r["seqlen"] == T]
        out += [f"## Fidelity: {regime}, T = {T}", ""]
        needle = any(r.get("needle_hit") is not None for r in rows)
        unf = any(r.get("recall_unfitted") is not None for r in rows)
        per_head = any(r.get("recall_by_kv_head") for r in rows) and regime.startswith("file:")
        header = ["variant", "top_k", "scorer", "recall", "p10", "oracle", "cover union", "err gated", "MFLOP fwd",
                  "fit"]
        if needle:
            header[7:7] = ["needle hit", "oracle hit"]
        if per_head:
            header += ["recall per kv head"]
        if unf:
            header += ["recall (random w)"] + (["needle (random w)"] if needle else [])
        body = []
        for r in sorted(rows, key=lambda r: -(r.get("recall") or -1)):
            if r["status"] != "ok":
                body.append([r["label"], "", "", f"error: {r['error'][:80]}"] + [""] * (len(header) - 4))
                continue
            fit = "" if r.get("distill_fitted") is None and r.get("pool_fitted") is None else (
                "ok" if r.get("fit_ok", True) else "**failed**")
            if r.get("layer") == "all" and not r.get("fit_ok", True):
                fit = "**failed** (a layer)"
            line = [r["label"] + (" (build failed)" if r.get("build_error") else ""), _fmt(r["top_k"]), r["scorer"],
                    pm(r), _fmt(r["recall_p10"]), pm(r, "recall_oracle"), _fmt(r["cover_union"])]
            if needle:
                line += [pm(r, "needle_hit"), _fmt(r["needle_hit_oracle"], 2)]
            line += [pm(r, "err_gated"), f"{r['forward_gflop'] * 1e3:.1f}" if r.get("forward_gflop") else "", fit]
            if per_head:
                line += [", ".join(_fmt(x) for x in r.get("recall_by_kv_head") or [])]
            if unf:
                line += [_fmt(r["recall_unfitted"])] + ([_fmt(r["needle_hit_unfitted"], 2)] if needle else [])
            body.append(line)
        out += [_md_table(header, body), ""]
    out += ["## Speed", ""]
    if ok_speed:
        from .roofline import ASSUMED_H100

        body = [[r["label"], r["regime"], str(r["seqlen"]), (r.get("device") or "") + (" (legacy)" if r.get("legacy")
                                                                                       else ""),
                 _fmt(r.get("forward_ms")), _fmt(r.get("forward_tflops"), 1), _fmt(r.get("fwd_bwd_ms")),
                 _fmt(r.get("dense_cudnn_ms")), _fmt(r.get("dense_flash_ms")), _fmt(r.get("dense_fwd_bwd_ms")),
                 _fmt(r.get("speedup_vs_best_dense"), 2),
                 (f"{100 * r['roofline_fraction']:.0f}% ({r['bound']})" if r.get("roofline_fraction") is not None
                  else ""), "**below**" if r.get("flagged") else ""] for r in ok_speed]
        threshold = (sweep.speed.get("min_roofline") if sweep is not None else None) or 0.2
        sources = sorted({r.get("ceilings") for r in ok_speed if r.get("ceilings")})
        out += [_md_table(["variant", "regime", "T", "device", "fwd ms", "TFLOP/s", "fwd+bwd ms", "dense cuDNN fwd",
                           "dense flash fwd", "best dense fwd+bwd", "speedup vs best dense fwd", "of roofline",
                           f"< {100 * threshold:.0f}%"], body), "",
                "Medians of `triton.testing.do_bench`; dense SDPA measured in the same run (specgen.perf.bench). "
                "**of roofline**: the shortest time the hardware allows for the variant's forward (FLOPs and bytes "
                "from `specgen.compile.analysis`) divided by the measured time; a kernel below "
                f"{100 * threshold:.0f}% (`speed.min_roofline`) runs an unoptimised path at this shape, so its time "
                "says little about the variant. Ceilings: " + ("; ".join(sources) or ASSUMED_H100["source"]) + "."
                + (" *(legacy)*: a record written before resume keys carried the fit settings." if any(
                    r.get("legacy") for r in ok_speed) else ""), ""]
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
        out += ["## Plots", "",
                "Recall against the selection budget, one line per selection unit (a line never joins different "
                "units), error bars the seed spread, dotted the oracle ceilings:", "",
                f"![recall vs budget]({plots[0]})", "",
                "Recall against cost at the same length: the forward time measured at that length on a GPU, else "
                "the analysis FLOPs (the axis says which):", "", f"![recall vs cost]({plots[1]})", ""]
    else:
        out += ["## Plots", "", "Not drawn: matplotlib is not installed (`pip install matplotlib`).", ""]
    return "\n".join(out)


__all__ = ["ALL_LAYERS", "fidelity_rows", "speed_rows", "write_csv", "write_plots", "write_report"]
