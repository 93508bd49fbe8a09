"""The sweep report's two plots, drawn to be read at a glance (matplotlib, optional).

* `recall_budget`: recall against the selection budget (tokens per query and kv group), one panel per regime and
  length, one line per selection unit (block l'=8, l'=16, ..., token). A line joins the budgets of one unit only:
  different units are different designs, never points of one trend. Error bars: the seed spread (1 sd); dotted:
  each unit's oracle ceiling; hollow crossed markers: rows whose fit failed (left out of the conclusions).
* `recall_time`: recall against the forward time measured at the *same* length (GPU sweeps whose speed lengths
  include the fidelity length), else against the analysis FLOPs at that length, as the axis says. Each point is
  labelled with its variant; labels are placed so that no two overlap (`place_labels`); Pareto-optimal points have
  a black edge; a red ring marks a time below the sweep's roofline fraction (specgen.study.roofline).
"""

from __future__ import annotations

import math

LABEL_GID = "variant-label"          # every point label carries it, so a test can find them


def _mpl():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _overlaps(a, b, pad: float = 1.0) -> bool:
    return not (a.x1 + pad <= b.x0 or b.x1 + pad <= a.x0 or a.y1 + pad <= b.y0 or b.y1 + pad <= a.y0)


# Offsets (points) tried around a marker, nearest first; further rings use the same directions.
_DIRECTIONS = [(1, 1), (1, -1), (-1, 1), (-1, -1), (0, 1.4), (0, -1.4), (1.4, 0), (-1.4, 0)]


def place_labels(ax, xs: list[float], ys: list[float], texts: list[str], *, fontsize: float = 7,
                 avoid: list | None = None) -> list:
    """Annotate each (x, y) with its text where the label's box overlaps no other label (nor the boxes in `avoid`,
    display coordinates) and stays inside the axes: nearby offsets first, then further ones with a leader line.
    A label that fits nowhere is not drawn on the point; it is listed under the panel instead (the list is one text
    below the axes, which no label enters). Returns the Annotation objects drawn."""
    from matplotlib.transforms import Bbox

    fig = ax.figure
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    frame = ax.get_window_extent(renderer)
    # The markers themselves are kept clear too (a label on a point hides it).
    r = 4.0 * fig.dpi / 72
    markers = [Bbox.from_extents(px - r, py - r, px + r, py + r)
               for px, py in ax.transData.transform(list(zip(xs, ys)))] if len(xs) else []
    placed = list(avoid or []) + markers
    drawn, left_over = [], []
    order = sorted(range(len(texts)), key=lambda i: (-ys[i], xs[i]))
    for i in order:
        ok = None
        for ring in (6, 12, 20, 30, 42):
            for dx, dy in _DIRECTIONS:
                off = (dx * ring, dy * ring - (3 if dy < 0 else 0))
                ha = "left" if dx > 0 else "right" if dx < 0 else "center"
                va = "bottom" if dy > 0 else "top" if dy < 0 else "center"
                ann = ax.annotate(texts[i], (xs[i], ys[i]), xytext=off, textcoords="offset points", fontsize=fontsize,
                                  ha=ha, va=va, gid=LABEL_GID,
                                  arrowprops=dict(arrowstyle="-", lw=0.4, color="0.5") if ring > 12 else None)
                box = ann.get_window_extent(renderer)
                inside = (box.x0 >= frame.x0 and box.x1 <= frame.x1 and box.y0 >= frame.y0 and box.y1 <= frame.y1)
                if inside and not any(_overlaps(box, other) for other in placed):
                    ok = (ann, box)
                    break
                ann.remove()
            if ok:
                break
        if ok:
            drawn.append(ok[0])
            placed.append(ok[1])
        else:
            left_over.append(texts[i])
    if left_over:
        ax.text(0.0, -0.22, "not labelled (no room): " + ", ".join(left_over), transform=ax.transAxes, fontsize=6,
                va="top", wrap=True)
    return drawn


def short_regime(regime: str) -> str:
    """A panel title: a capture's file name and layer instead of its whole path."""
    if not regime.startswith("file:"):
        return regime
    body = regime[5:]
    all_layers = body.endswith(" (all layers)")
    body = body.removesuffix(" (all layers)")
    path, _, layer = body.partition("#layer=")
    name = path.replace("\\", "/").rsplit("/", 1)[-1]
    return f"{name}, " + ("all layers" if all_layers else f"layer {layer}" if layer else "capture")


def _series(row: dict) -> str:
    return row["series"]


def series_name(series: str) -> str:
    """"block_l8" -> "block, l'=8"; "token_l1" -> "token" (other label parts kept)."""
    parts = series.split("_")
    if parts[0] == "token":
        rest = [p for p in parts[1:] if p != "l1"]
        return ", ".join(["token"] + rest)
    return ", ".join(p.replace("l", "l'=", 1) if p.startswith("l") and p[1:].isdigit() else p for p in parts)


def _colours(rows: list[dict]) -> dict:
    plt = _mpl()
    names = sorted({_series(r) for r in rows}, key=lambda s: (s.startswith("token"), _unit_of(s), s))
    cmap = plt.get_cmap("tab10")
    return {s: cmap(i % 10) for i, s in enumerate(names)}


def _unit_of(series: str) -> int:
    digits = "".join(ch if ch.isdigit() else " " for ch in series).split()
    return int(digits[0]) if digits else 0


def _panels(rows: list[dict]) -> list[tuple]:
    return sorted({(r["regime"], r["seqlen"]) for r in rows}, key=lambda g: (g[0], g[1]))


def _grid(plt, n: int, width: float, height: float):
    cols = min(n, 3)
    rows = math.ceil(n / cols)
    fig, axs = plt.subplots(rows, cols, figsize=(width * cols, height * rows), squeeze=False)
    flat = [a for row in axs for a in row]
    for extra in flat[n:]:
        extra.set_visible(False)
    return fig, flat[:n]


def recall_budget(rows: list[dict]):
    """The figure (see the module docstring); rows carry regime, seqlen, series, tokens, recall, recall_sd,
    recall_oracle, fit_ok, label."""
    plt = _mpl()
    panels = _panels(rows)
    colours = _colours(rows)
    fig, axs = _grid(plt, len(panels), 6.6, 4.0)
    for ax, (regime, T) in zip(axs, panels):
        here = [r for r in rows if r["regime"] == regime and r["seqlen"] == T]
        names = sorted({_series(r) for r in here}, key=lambda s: (s.startswith("token"), _unit_of(s), s))
        for n, s in enumerate(names):
            pts = sorted((r for r in here if _series(r) == s), key=lambda r: r["tokens"])
            c = colours[s]
            # Series side by side around each budget (log axis: a small factor), so error bars do not cover each other.
            dodge = 2 ** (0.05 * (n - (len(names) - 1) / 2))
            x = [r["tokens"] * dodge for r in pts]
            ok = [i for i, r in enumerate(pts) if r.get("fit_ok", True)]
            ax.errorbar(x, [r["recall"] for r in pts], yerr=[r.get("recall_sd") or 0.0 for r in pts], color=c,
                        marker="o" if ok else "none", ms=4, lw=1.2, capsize=2, label=series_name(s),
                        markevery=ok or None)
            bad = [i for i, r in enumerate(pts) if not r.get("fit_ok", True)]
            if bad:
                ax.scatter([x[i] for i in bad], [pts[i]["recall"] for i in bad], s=40, color=c, marker="x",
                           zorder=3)
            orc = [i for i, r in enumerate(pts) if r.get("recall_oracle") is not None]
            if orc:
                ax.plot([x[i] for i in orc], [pts[i]["recall_oracle"] for i in orc], color=c, ls=":", lw=1,
                        marker="_", ms=8)
        budgets = sorted({r["tokens"] for r in here})
        ax.set_xscale("log", base=2)
        ax.set_xlim(budgets[0] / 1.6, budgets[-1] * 1.6)
        ax.set_xticks(budgets, [str(b) for b in budgets])
        ax.minorticks_off()
        ax.set_xlabel("selection budget (tokens per query and kv group)")
        ax.set_ylabel("recall of dense attention mass")
        ax.set_title(f"{short_regime(regime)}, T={T}", fontsize=10)
        ax.grid(alpha=0.3)
        if ax is not axs[-1]:
            continue                              # one legend (the colours are the same in every panel)
        handles, labels = [], []
        for other in axs:
            for h, lab in zip(*other.get_legend_handles_labels()):
                if lab not in labels:
                    handles.append(h)
                    labels.append(lab)
        from matplotlib.lines import Line2D

        handles += [Line2D([], [], color="0.4", ls=":", marker="_", ms=8),
                    Line2D([], [], color="0.4", marker="x", ls="none")]
        labels += ["oracle ceiling (dashes, dotted line)", "fit failed (left out)"]
        ax.legend(handles, labels, fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0)
    fig.suptitle("recall vs budget per selection unit (error bars: 1 sd over seeds)", fontsize=10)
    fig.tight_layout()
    return fig


def recall_time(rows: list[dict]):
    """The figure (see the module docstring); rows carry regime, seqlen, series, label, recall, recall_sd, cost,
    cost_kind ("ms" or "mflop"), flagged, fit_ok. Returns (figure, {panel: [label annotations]})."""
    plt = _mpl()
    panels = _panels(rows)
    colours = _colours(rows)
    fig, axs = _grid(plt, len(panels), 5.6, 4.4)
    todo = []
    for ax, (regime, T) in zip(axs, panels):
        here = [r for r in rows if r["regime"] == regime and r["seqlen"] == T and r.get("cost") is not None]
        xs = [r["cost"] for r in here]
        ys = [r["recall"] for r in here]
        front = _pareto(list(zip(xs, ys)))
        for i, r in enumerate(here):
            c = colours[_series(r)]
            face = c if r.get("fit_ok", True) else "none"
            ax.errorbar([xs[i]], [ys[i]], yerr=[r.get("recall_sd") or 0.0], color=c, capsize=2, lw=0.8,
                        marker="o", ms=6, mfc=face, mec="black" if i in front else c, mew=1.4 if i in front else 0.8)
            if r.get("flagged"):
                ax.scatter([xs[i]], [ys[i]], s=150, facecolors="none", edgecolors="red", lw=1.0, zorder=3)
        kind = here[0]["cost_kind"] if here else "mflop"
        ax.set_xlabel(f"forward time, ms (GPU, T={T})" if kind == "ms" else
                      f"forward MFLOP at T={T}\n(specgen.compile.analysis: no GPU time at this length)", fontsize=9)
        ax.set_ylabel("recall of dense attention mass")
        ax.set_title(f"{short_regime(regime)}, T={T}", fontsize=10)
        ax.grid(alpha=0.3)
        if xs:
            span = (max(xs) - min(xs)) or max(xs) or 1.0
            ax.set_xlim(min(xs) - 0.35 * span, max(xs) + 0.35 * span)
            yspan = (max(ys) - min(ys)) or 0.1
            ax.set_ylim(min(ys) - 0.3 * yspan, max(ys) + 0.3 * yspan)
        todo.append((ax, (regime, T), xs, ys, [r["label"] for r in here]))
    from matplotlib.lines import Line2D

    key = [Line2D([], [], ls="none", marker="o", mfc="0.7", mec="black", mew=1.4, label="Pareto-optimal"),
           Line2D([], [], ls="none", marker="o", mfc="none", mec="0.5", label="fit failed (left out)"),
           Line2D([], [], ls="none", marker="o", ms=12, mfc="none", mec="red", label="below roofline fraction")]
    fig.legend(handles=key, loc="lower center", ncol=3, fontsize=7, frameon=False)
    fig.suptitle("recall vs cost at the same length", fontsize=10)
    fig.tight_layout(rect=(0, 0.05, 1, 1))
    # Labels last: a layout change after placing them would move the points under them.
    labels = {panel: place_labels(ax, xs, ys, texts) for ax, panel, xs, ys, texts in todo}
    return fig, labels


def _pareto(points: list[tuple[float, float]]) -> list[int]:
    """Indices of points not dominated (lower cost x, higher quality y)."""
    front = []
    for i, (x, y) in enumerate(points):
        if not any((x2 <= x and y2 >= y) and (x2 < x or y2 > y) for j, (x2, y2) in enumerate(points) if j != i):
            front.append(i)
    return front


def available() -> bool:
    try:
        _mpl()
    except ImportError:
        return False
    return True


__all__ = ["LABEL_GID", "available", "place_labels", "recall_budget", "recall_time"]
