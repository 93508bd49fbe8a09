"""Sweeps a researcher can act on: fits that are checked, conclusions only beyond the seed spread, resume keys that
change with every setting that changes a result, plots whose labels do not collide, Ctrl-C that leaves a resumable
folder, and the roofline flag on speed rows. CPU, tiny shapes."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

from specgen.study import conclusions
from specgen.study import fidelity as F
from specgen.cli import main
from specgen.study.report import speed_rows
from specgen.study.roofline import ASSUMED_H100, roofline
from specgen.study.sweep import expand, read_records, run_sweep, sweep_from_mapping

sys.path.insert(0, str(Path(__file__).resolve().parent))
from test_sweep import small_sweep  # noqa: E402


def quiet(*_):
    pass


def _rand() -> int:
    return int(torch.randint(0, 2**31 - 1, ()))


# ---------------------------------------------------------------------------------------------------------------
# Fit checks
# ---------------------------------------------------------------------------------------------------------------

def test_a_fit_that_does_not_beat_random_weights_by_10_percent_fails():
    ok = F.check_fit([{"what": "indexer", "seed": 0, "eval_loss_unfitted": 1.88, "eval_loss_fitted": 0.65}])
    assert ok["ok"] and ok["reason"] == ""
    worse = F.check_fit([{"what": "indexer", "seed": 1, "eval_loss_unfitted": 1.88, "eval_loss_fitted": 7.35}])
    assert not worse["ok"] and "7.350 vs 1.880" in worse["reason"] and "seed 1" in worse["reason"]
    barely = F.check_fit([{"what": "indexer", "eval_loss_unfitted": 2.0, "eval_loss_fitted": 1.85}])
    assert not barely["ok"]                                           # 7.5% below: not enough
    nan = F.check_fit([{"what": "linear pool", "eval_loss_unfitted": 2.0, "eval_loss_fitted": float("nan")}])
    assert not nan["ok"]


def test_a_broken_fit_is_marked_failed_and_kept_out_of_the_headline(tmp_path):
    # fit_lr 0: the "fitted" indexer keeps its random weights, so its held-out loss equals random weights'.
    sweep = sweep_from_mapping(small_sweep(regimes=["structured"], fidelity={
        "fit_steps": 6, "fit_lr": 0.0, "train_T": 32, "train_batch": 1, "seeds": 2}))
    run_sweep(sweep, tmp_path, build=False, log=quiet)
    token = next(r for r in read_records(tmp_path / "results.jsonl")
                 if r["part"] == "fidelity" and r["label"] == "token_l1_b32")
    assert token["fit_check"]["ok"] is False and "not 10% below" in token["fit_check"]["reason"]
    details = token["fit"]["details"]
    assert len(details) == 2 and all(d["eval_loss_fitted"] == pytest.approx(d["eval_loss_unfitted"]) for d in details)
    report = (tmp_path / "report.md").read_text()
    headline = report.split("## Headline")[1].split("## How this was measured")[0]
    line = next(x for x in headline.splitlines() if x.startswith("- **structured"))
    # The conclusion compares the block variants only and names the excluded row with the reason.
    assert "best `block_l" in line and "runner-up `block_l" in line
    assert "`block_l8_b32`" in line and "`block_l16_b32`" in line
    assert "Left out (fit failed): `token_l1_b32`" in line and "token-level" not in line
    assert "**1 fit(s) failed**" in headline
    assert "**failed**" in report.split("## Fitted scorers")[1]


def test_differences_inside_two_sigma_are_undecided():
    a = {"label": "a", "recall": 0.80, "recall_sd": 0.02, "seeds": 3}
    b = {"label": "b", "recall": 0.75, "recall_sd": 0.02, "seeds": 3}
    c = conclusions.compare(a, b)
    assert c["margin"] == pytest.approx(2 * (0.02 ** 2 * 2) ** 0.5) and not c["decided"]   # 0.05 < 0.0566
    far = conclusions.compare({**a, "recall": 0.90}, b)
    assert far["decided"] and far["winner"]["label"] == "a"
    one = conclusions.compare({**a, "recall": 0.99, "seeds": 1}, {**b, "seeds": 1})
    assert not one["decided"]                                          # no spread, no verdict
    rows = [{**a, "regime": "r", "seqlen": 64, "budget": 32, "granularity": "token", "status": "ok",
             "recall_oracle": 0.95},
            {**b, "regime": "r", "seqlen": 64, "budget": 32, "granularity": "block", "status": "ok",
             "recall_oracle": 0.85}]
    (line,) = conclusions.headline(rows, granularity_varies=True)
    assert "**undecided**" in line and "0.800 ± 0.020 vs block-level `b` 0.750 ± 0.020" in line
    assert "oracle ceiling 0.950, `a`" in line


# ---------------------------------------------------------------------------------------------------------------
# Resume keys
# ---------------------------------------------------------------------------------------------------------------

def test_changing_a_setting_that_changes_the_result_reruns_the_point(tmp_path):
    one = dict(axes={"selection.block": [8]}, regimes=["structured"])
    fid = {"fit_steps": 2, "train_T": 32, "train_batch": 1, "seeds": 1}
    assert run_sweep(sweep_from_mapping(small_sweep(**one, fidelity=fid)), tmp_path, build=False,
                     log=quiet)["ran"] == 1
    assert run_sweep(sweep_from_mapping(small_sweep(**one, fidelity=fid)), tmp_path, build=False,
                     log=quiet)["ran"] == 0
    for change in ({"fit_steps": 3}, {"train_T": 16}, {"train_batch": 2}, {"seeds": 2}, {"fit_lr": 0.02}):
        ran = run_sweep(sweep_from_mapping(small_sweep(**one, fidelity={**fid, **change})), tmp_path, build=False,
                        log=quiet)["ran"]
        assert ran == 1, change
    assert run_sweep(sweep_from_mapping(small_sweep(**one, fidelity=fid, batch=2)), tmp_path, build=False,
                     log=quiet)["ran"] == 1
    # The report shows the result of the settings the sweep has now, not the latest record of the variant.
    run_sweep(sweep_from_mapping(small_sweep(**one, fidelity=fid)), tmp_path, build=False, log=quiet)
    rows = json.loads((tmp_path / "results.json").read_text())["fidelity"]
    assert len(rows) == 1 and rows[0]["seeds"] == 1
    assert "fidelity records measured with other settings" in (tmp_path / "report.md").read_text()


def test_a_changed_capture_file_is_measured_again(tmp_path):
    g = torch.Generator().manual_seed(_rand())

    def write():
        torch.save({"q": torch.randn(2, 64, 4, 32, generator=g), "k": torch.randn(2, 64, 2, 32, generator=g),
                    "v": torch.randn(2, 64, 2, 32, generator=g)}, tmp_path / "cap.pt")

    write()
    data = small_sweep(axes={"selection.block": [8]}, regimes=["file:cap.pt"],
                       fidelity={"fit_steps": 2, "seeds": 1})
    assert run_sweep(sweep_from_mapping(data, path=tmp_path / "s.sweep.yaml"), tmp_path / "o", build=False,
                     log=quiet)["ran"] == 1
    assert run_sweep(sweep_from_mapping(data, path=tmp_path / "s.sweep.yaml"), tmp_path / "o", build=False,
                     log=quiet)["ran"] == 0
    write()
    assert run_sweep(sweep_from_mapping(data, path=tmp_path / "s.sweep.yaml"), tmp_path / "o", build=False,
                     log=quiet)["ran"] == 1


# ---------------------------------------------------------------------------------------------------------------
# Ctrl-C
# ---------------------------------------------------------------------------------------------------------------

def test_ctrl_c_prints_one_line_and_leaves_a_resumable_folder(tmp_path, monkeypatch, capsys):
    import specgen.study.sweep as S

    path = tmp_path / "s.sweep.yaml"
    path.write_text(json.dumps(small_sweep(regimes=["retrieval"], fidelity={"fit_steps": 2, "train_T": 32,
                                                                             "train_batch": 1, "seeds": 1})))
    real = S.measure_task
    calls = []

    def interrupted_on_the_second(task):
        calls.append(task["key"])
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(task)

    monkeypatch.setattr(S, "measure_task", interrupted_on_the_second)
    assert main(["sweep", str(path), "--out", str(tmp_path / "out"), "--jobs", "1"]) == 130
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "interrupted: 1 of 3 measurements saved" in err[0] and "run the same command" in err[0]
    saved = [r for r in read_records(tmp_path / "out" / "results.jsonl") if r["part"] == "fidelity"]
    assert len(saved) == 1 and saved[0]["status"] == "ok"
    monkeypatch.setattr(S, "measure_task", real)
    assert main(["sweep", str(path), "--out", str(tmp_path / "out"), "--jobs", "1"]) == 0
    done = [r for r in read_records(tmp_path / "out" / "results.jsonl") if r["part"] == "fidelity"]
    assert len(done) == 3 and done[0]["key"] == calls[0]                # the first is not measured again


# ---------------------------------------------------------------------------------------------------------------
# Plots
# ---------------------------------------------------------------------------------------------------------------

def test_point_labels_do_not_collide(tmp_path):
    pytest.importorskip("matplotlib")
    from specgen.study import plots

    g = torch.Generator().manual_seed(_rand())
    rows = []
    for i in range(14):                      # crowded: costs and recalls close together, long labels
        unit = [8, 16, 32, 64, 1][i % 5]
        rows.append({"regime": "structured", "seqlen": 1024, "series": f"block_l{unit}" if unit > 1 else "token_l1",
                     "label": f"{'block' if unit > 1 else 'token'}_l{unit}_b{128 * (1 + i // 5)}_variant{i}",
                     "recall": 0.6 + 0.02 * float(torch.rand((), generator=g)),
                     "recall_sd": 0.01, "cost": 500 + 5 * float(torch.rand((), generator=g)), "cost_kind": "mflop",
                     "flagged": i % 3 == 0, "fit_ok": i != 4, "tokens": 128})
    fig, placed = plots.recall_time(rows)
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    texts = [t for t in fig.findobj(lambda a: getattr(a, "get_gid", lambda: None)() == plots.LABEL_GID)]
    assert len(texts) == len(placed[("structured", 1024)]) >= 6      # most labelled; the rest listed below
    boxes = [t.get_window_extent(renderer) for t in texts]
    for i in range(len(boxes)):
        for j in range(i + 1, len(boxes)):
            assert not boxes[i].overlaps(boxes[j]), (texts[i].get_text(), texts[j].get_text())
    listed = [t.get_text() for t in fig.axes[0].texts if t.get_text().startswith("not labelled")]
    drawn = {t.get_text() for t in texts}
    assert all(r["label"] in drawn or (listed and r["label"] in listed[0]) for r in rows)   # every variant named
    fig.savefig(tmp_path / "crowded.png")
    import matplotlib.pyplot as plt

    plt.close(fig)


def test_recall_vs_budget_never_joins_block_sizes_to_token_level():
    pytest.importorskip("matplotlib")
    from specgen.study import plots

    rows = [{"regime": "r", "seqlen": 64, "series": s, "label": f"{s}_b{b}", "tokens": b, "recall": 0.5 + 0.001 * b,
             "recall_sd": 0.01, "recall_oracle": 0.9} for s in ("block_l8", "block_l16", "token_l1")
            for b in (32, 64)]
    fig = plots.recall_budget(rows)
    ax = fig.axes[0]
    solid = [ln for ln in ax.get_lines() if ln.get_linestyle() == "-" and len(ln.get_xdata()) > 1]
    assert len(solid) == 3                                           # one line per unit, over its budgets only
    for ln in solid:
        xs = sorted(ln.get_xdata())
        assert xs[-1] / xs[0] == pytest.approx(2.0, rel=0.01)        # 32 -> 64 of one unit (dodged alike)
    import matplotlib.pyplot as plt

    plt.close(fig)


# ---------------------------------------------------------------------------------------------------------------
# Roofline flag
# ---------------------------------------------------------------------------------------------------------------

def test_roofline_fraction_and_flag():
    peaks = dict(ASSUMED_H100)
    # 1 GFLOP and 1 GB: memory bound on the assumed ceilings (0.30 ms vs 0.001 ms).
    fast = roofline(1e9, 1e9, 0.6, peaks, 0.2)
    assert fast["bound"] == "memory" and fast["roofline_fraction"] == pytest.approx(1e9 / 3350e9 * 1e3 / 0.6)
    assert not fast["flagged"]
    slow = roofline(1e9, 1e9, 3.0, peaks, 0.2)
    assert slow["flagged"] and slow["roofline_fraction"] < 0.2
    with pytest.raises(ValueError, match="forward_ms"):
        roofline(1e9, 1e9, 0.0, peaks)


def test_speed_rows_flag_slow_kernels_with_measured_or_assumed_ceilings():
    sweep = sweep_from_mapping(small_sweep())
    points = [p.summary() for p in expand(sweep) if p.status == "valid"]
    from specgen.compile.analysis import flops, forward_bytes
    from specgen.model.spec import spec_from_mapping

    block = next(p for p in points if p["label"] == "block_l8_b32")
    spec = spec_from_mapping(block["spec"])
    T = 8192
    floor_ms = max(flops(spec, T) / 989e12, forward_bytes(spec, T) / 3350e9) * 1e3
    measured = {"matmul_tflops": 500.0, "copy_gbps": 1000.0}
    floor_measured = max(flops(spec, T) / 500e12, forward_bytes(spec, T) / 1000e9) * 1e3
    records = [
        {"key": "a", "part": "speed", "status": "ok", "spec_hash": block["spec_hash"], "regime": "random",
         "seqlen": T, "device": "GPU", "settings": "x", "speed": {"forward_ms": floor_ms * 10}},
        {"key": "b", "part": "speed", "status": "ok", "spec_hash": block["spec_hash"], "regime": "structured",
         "seqlen": T, "device": "GPU", "settings": "x", "speed": {"forward_ms": floor_measured * 2,
                                                                  "machine": measured}},
    ]
    slow, fine = speed_rows(points, records, min_roofline=0.2)
    assert slow["regime"] == "random" and slow["flagged"] and slow["roofline_fraction"] == pytest.approx(0.1)
    assert "assumed H100" in slow["ceilings"]
    assert not fine["flagged"] and fine["roofline_fraction"] == pytest.approx(0.5)
    assert fine["ceilings"] == "measured in the same run"
