"""Sweeps (`specgen sweep`): grid expansion with invalid points and their reasons, budget-derived top_k, resuming,
fidelity metrics on planted cases with known answers, regimes, scorer fitting, and report generation. CPU, fast."""

from __future__ import annotations

import importlib.util
import json
import textwrap
from pathlib import Path

import pytest
import torch

from specgen.study import fidelity as F
from specgen import reference
from specgen.cli import main
from specgen.model.spec import spec_from_mapping
from specgen.study.sweep import (SweepError, build_task, expand, load_sweep, make_tasks, measure_task, read_records,
                           run_sweep,
                           sweep_from_mapping)

ROOT = Path(__file__).resolve().parent.parent
SWEEP_FILES = sorted((ROOT / "specs").glob("*.sweep.yaml"))

BASE = {"family": "nsa", "heads": {"q": 4, "kv": 2}, "head_dim": {"qk": 32, "v": 32}, "dtype": "fp16",
        "kv": "shared", "compression": {"block": 8, "stride": 4},
        "selection": {"block": 16, "top_k": 4, "initial": 1, "local": 1}, "window": {"size": 16},
        "max_seqlen": 4096}


def small_sweep(**over) -> dict:
    data = {"name": "tiny", "base": BASE,
            "axes": {"selection.granularity": ["block", "token"], "selection.block": [8, 16, 12]},
            "constraints": {"budget": {"tokens": 32}},
            "when": [{"if": {"selection.granularity": "token"}, "set": {"indexer": {"heads": 2, "head_dim": 16}}}],
            "seqlens": [64], "batch": 1, "regimes": ["structured", "retrieval"],
            "fidelity": {"fit_steps": 4, "train_T": 32, "train_batch": 1, "needles": 2, "seeds": 1}}
    data.update(over)
    return data


# ---------------------------------------------------------------------------------------------------------------
# Expansion
# ---------------------------------------------------------------------------------------------------------------

def test_expansion_is_the_cartesian_product_with_budget_derived_top_k():
    points = expand(sweep_from_mapping(small_sweep()))
    assert len(points) == 2 * 3                                   # granularity x block (x one budget)
    by_label = {p.label: p for p in points if p.status == "valid"}
    assert set(by_label) == {"block_l8_b32", "block_l16_b32", "token_l1_b32"}
    assert by_label["block_l8_b32"].top_k == 4                    # 32 tokens / blocks of 8
    assert by_label["block_l16_b32"].top_k == 2
    token = by_label["token_l1_b32"]
    assert token.top_k == 32 and token.spec.selection.block == 1 and token.spec.selection.scorer == "indexer"
    assert token.spec.indexer.heads == 2 and token.spec.indexer.head_dim == 16      # from the `when` rule
    assert by_label["block_l8_b32"].spec.indexer is None          # the rule applies to token points only
    assert len({p.hash for p in by_label.values()}) == 3
    assert all(p.spec.name == f"tiny_{p.label}" for p in by_label.values())


def test_invalid_points_keep_the_spec_error_reason_and_duplicates_are_measured_once():
    points = expand(sweep_from_mapping(small_sweep(axes={"selection.granularity": ["block", "token"],
                                                          "selection.block": [8, 12], "heads.kv": [2, 3]})))
    invalid = {p.label: p.reason for p in points if p.status == "invalid"}
    # 32 tokens in blocks of 12: not a whole number of blocks (the budget's own check).
    assert "not a whole number of selection blocks of 12" in invalid["block_l12_kv2_b32"]
    # 4 query heads in 3 kv groups: the spec model's SpecError, field and fix included.
    assert invalid["block_l8_kv3_b32"].startswith("heads.kv: 4 query heads do not split into 3 equal groups")
    assert "fix:" in invalid["block_l8_kv3_b32"]
    dups = [p for p in points if p.status == "duplicate"]
    # At token granularity selection.block does not apply: l'=12 collapses onto l'=8 (with a note).
    assert [p.label for p in dups] == ["token_l1_kv2_b32"]
    assert "same variant as point" in dups[0].reason
    assert any("does not apply at token granularity" in n for n in dups[0].notes)
    tasks = make_tasks(sweep_from_mapping(small_sweep()), points, "cpu")
    assert {t["spec_hash"] for t in tasks} == {p.hash for p in points if p.status == "valid"}


def test_budget_list_is_an_axis_and_top_k_cannot_be_given_as_well():
    points = expand(sweep_from_mapping(small_sweep(constraints={"budget": {"tokens": [32, 64]}})))
    valid = {p.label: p.top_k for p in points if p.status == "valid"}
    assert valid["block_l8_b64"] == 8 and valid["token_l1_b64"] == 64
    with pytest.raises(SweepError, match="derived from the budget"):
        sweep_from_mapping(small_sweep(axes={"selection.top_k": [2, 4]}))


def test_sweep_file_mistakes_name_the_field_and_line(tmp_path):
    path = tmp_path / "bad.sweep.yaml"
    path.write_text(textwrap.dedent("""\
        name: bad
        base: ../nowhere.yaml
        axes: {selection.block: [8]}
    """))
    with pytest.raises(SweepError, match="base spec"):
        load_sweep(path)
    (tmp_path / "b.yaml").write_text("name: b\nfamily: nsa\n")
    path.write_text("name: bad\nbase: b.yaml\naxes:\n  selection.blok: [8, 16]\n")
    with pytest.raises(SweepError) as exc:
        load_sweep(path)
    assert exc.value.line == 4 and "selection.block" in exc.value.fix


@pytest.mark.parametrize("path", SWEEP_FILES, ids=lambda p: p.stem)
def test_committed_sweeps_expand(path):
    points = expand(load_sweep(path))
    assert any(p.status == "valid" for p in points)


# ---------------------------------------------------------------------------------------------------------------
# Metrics on planted cases
# ---------------------------------------------------------------------------------------------------------------

PLANT = {"name": "plant", "family": "nsa", "heads": {"q": 1, "kv": 1}, "head_dim": {"qk": 16, "v": 16},
         "kv": "shared", "branches": ["compression", "selection", "window"],
         "compression": {"block": 8, "stride": 8}, "selection": {"block": 8, "top_k": 1, "initial": 0, "local": 0},
         "window": {"size": 4}, "max_seqlen": 64}


def planted(needle_logit: float) -> tuple:
    """T=64, one head. Every query is e0; key 10 has logit `needle_logit`, keys 40..47 logit 4, the rest 0. The
    compression scorer (mean pool over blocks of 8) sees block 1 at needle_logit / 8 and block 5 at 4."""
    spec = spec_from_mapping(PLANT)
    T, D = 64, 16
    scale = spec.softmax_scale
    q = torch.zeros(1, T, 1, D, dtype=torch.float64)
    q[..., 0] = 1.0
    k = torch.zeros(1, T, 1, D, dtype=torch.float64)
    k[0, 10, 0, 0] = needle_logit / scale
    k[0, 40:48, 0, 0] = 4.0 / scale
    v = torch.randn(1, T, 1, D, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    needles = torch.tensor([[0, 63, 0, 10]])
    return spec, F.Inputs(q, k, v, needles)


def test_recall_and_needle_hit_when_the_scorer_finds_the_needle():
    spec, x = planted(48.0)                                       # block 1 pooled: 6 > 4
    m = F.fidelity(spec, x, eval_from=63)
    assert m["recall"] == pytest.approx(1.0, abs=1e-9)
    assert m["recall_oracle"] == pytest.approx(1.0, abs=1e-9)
    assert m["needle_hit"] == 1.0 and m["needle_hit_oracle"] == 1.0
    assert m["needle_mass"] == pytest.approx(1.0, abs=1e-9)
    assert m["needle_hit_window"] == 0.0 and m["cover_window"] == pytest.approx(0.0, abs=1e-9)
    assert m["err_selection"] == pytest.approx(0.0, abs=1e-9)     # all the mass is on the selected needle
    assert m["selected_tokens"] == 8


def test_recall_and_needle_hit_when_pooling_hides_the_needle():
    spec, x = planted(24.0)                                       # block 1 pooled: 3 < 4: block 5 wins
    m = F.fidelity(spec, x, eval_from=63)
    assert m["recall"] == pytest.approx(0.0, abs=1e-6)
    assert m["recall_oracle"] == pytest.approx(1.0, abs=1e-6)
    assert m["needle_hit"] == 0.0 and m["needle_hit_oracle"] == 1.0
    assert m["err_selection"] > 0.5
    assert m["cover_compression"] == pytest.approx(1.0, abs=1e-9)  # the needle's block is pooled and visible


def test_token_oracle_takes_the_heaviest_tokens():
    spec = spec_from_mapping({**PLANT, "selection": {"granularity": "token", "top_k": 2, "scorer": "indexer"},
                              "indexer": {"heads": 1, "head_dim": 16}})
    mass = torch.zeros(1, 4, 1, 4, dtype=torch.float64)
    mass[0, 3, 0] = torch.tensor([0.1, 0.5, 0.0, 0.4])
    idx = F.oracle_indices(spec, mass)
    assert idx[0, 3, 0].tolist() == [1, 3]
    assert idx[0, 0, 0].tolist() == [0, -1]                      # one visible token: padding


# ---------------------------------------------------------------------------------------------------------------
# Regimes and fitting
# ---------------------------------------------------------------------------------------------------------------

def _spec_token():
    return spec_from_mapping({**BASE, "name": "t", "selection": {"granularity": "token", "top_k": 16,
                                                                 "scorer": "indexer"},
                              "indexer": {"heads": 2, "head_dim": 16}})


def test_regimes_have_the_structure_they_claim():
    spec = _spec_token()
    train, ev = F.splits(spec, "retrieval", 256, batch=2, train_batch=1, n_needles=8)
    again = F.splits(spec, "retrieval", 256, batch=2, train_batch=1, n_needles=8)[1]
    assert torch.equal(ev.q, again.q) and torch.equal(ev.needles, again.needles)   # same eval for every variant
    assert not torch.equal(train(0).q, train(1).q)                                # fresh training draws
    d = F.dense_attention(spec, ev)
    b, t, g, s = ev.needles.unbind(-1)
    assert ((t - s) >= 256 // 4).all()                                              # far beyond the window
    assert float(d.mass[b, t, g, s].mean()) > 0.1                                   # probes do find their needle
    x = F.make_regime("structured", B=1, T=256, seed=1, **F.shapes_of(spec))
    mass = F.dense_attention(spec, x).mass[:, 128:]
    assert float(mass[..., 0].mean()) > 0.02                                        # a sink
    local = torch.stack([torch.diagonal(mass[0, :, g], offset=128) for g in range(2)])
    assert float(local.mean()) > 0.02                                               # attention to itself


def test_fitting_the_indexer_lowers_the_held_out_distillation_loss():
    spec = _spec_token()
    train, ev = F.splits(spec, "structured", 128, batch=1, train_batch=2, train_T=64)
    init, fitted, log = F.fit_indexer(spec, train, ev, steps=40, lr=2e-2)
    assert log["eval_loss_fitted"] < log["eval_loss_unfitted"]
    assert "fresh draws" in log["how"]
    # The fitting loss with a precomputed target is the reference distillation loss.
    x = train(0)
    m = F.IndexerMap(spec).double()
    target = reference.distill_target(spec, x.q, x.k).transpose(1, 2)
    T = x.q.shape[1]
    pos = torch.arange(T)
    bias = torch.zeros(T, T, dtype=torch.float64).masked_fill(pos[None, :] > pos[:, None], float("-inf"))
    entropy = float((target * torch.log(torch.where(target > 0, target, torch.ones_like(target)))).sum(-1).mean())
    with torch.no_grad():
        ours = F._target_kl(spec, m, x.q, x.k, target, bias, entropy)
        theirs = reference.distill_loss(spec, x.q, x.k, **m.inputs(x.q, x.k))
    assert float(ours) == pytest.approx(float(theirs), rel=1e-9)


def test_fitting_a_linear_pool_starts_at_mean_pooling_and_improves():
    spec = spec_from_mapping({**BASE, "name": "lp", "compression": {"block": 8, "stride": 4, "pool": "linear"}})
    train, ev = F.splits(spec, "structured", 64, batch=1, train_batch=1)
    x = train(0)
    mean = F.fidelity(spec_from_mapping({**BASE, "name": "lp"}), x, eval_from=0)
    same = F.fidelity(spec, x, F.Fitted(pool=F.mean_pool_init(spec, x.q)), eval_from=0)
    assert same["err_compression"] == pytest.approx(mean["err_compression"], rel=1e-9)   # the init is mean pooling
    pool, log = F.fit_pool(spec, train, steps=15, lr=1e-2)
    assert log["train_loss_last"] < log["train_loss_first"]
    unfitted, fitted = F.fit_scorers(spec, train, ev, steps=6)
    assert fitted.log["fitted"] == ["linear pool"] and fitted.pool is not None and unfitted.pool is None


def test_captured_qkv_file_is_a_regime(tmp_path):
    spec = spec_from_mapping({**BASE, "name": "c"})
    g = torch.Generator().manual_seed(0)
    torch.save({"q": torch.randn(2, 64, 4, 32, generator=g), "k": torch.randn(2, 64, 2, 32, generator=g),
                "v": torch.randn(2, 64, 2, 32, generator=g)}, tmp_path / "cap.pt")
    train, ev = F.splits(spec, "file:cap.pt", 64, batch=1, train_batch=1, base_dir=tmp_path)
    assert train(0).q.shape == (1, 64, 4, 32) and ev.q.shape == (1, 64, 4, 32)
    assert F.evaluate_variant(spec, "file:cap.pt", 64, base_dir=tmp_path)["metrics"]["T"] == 64
    other = spec_from_mapping({**BASE, "name": "c", "heads": {"q": 4, "kv": 1}})
    with pytest.raises(ValueError, match="Hkv"):
        F.check_shapes(other, ev)
    # In a sweep: one measurement per variant, recorded at the file's length.
    sweep = sweep_from_mapping(small_sweep(regimes=["file:cap.pt"], axes={"selection.block": [8]}),
                               path=tmp_path / "s.sweep.yaml")
    run_sweep(sweep, tmp_path / "out", build=False, log=lambda s: None)
    (rec,) = [r for r in read_records(tmp_path / "out" / "results.jsonl") if r["part"] == "fidelity"]
    assert rec["status"] == "ok" and rec["seqlen"] == 64 and "|file:cap.pt|0|fidelity|s=" in rec["key"]


# ---------------------------------------------------------------------------------------------------------------
# Running, resuming, reporting
# ---------------------------------------------------------------------------------------------------------------

def test_run_resumes_and_reports(tmp_path, monkeypatch):
    sweep = sweep_from_mapping(small_sweep(regimes=["retrieval"]))
    lines = []
    first = run_sweep(sweep, tmp_path, build=False, log=lines.append)
    assert first["ran"] == 3 and first["errors"] == 0            # 3 valid variants x 1 regime x 1 seqlen
    records = read_records(tmp_path / "results.jsonl")
    ok = [r for r in records if r["status"] == "ok"]
    assert len(ok) == 3 and all(r["part"] == "fidelity" for r in ok)
    assert all(r["speed"] == "no GPU" for r in records if r["part"] == "speed")
    assert any(line.startswith("[  3/3]") for line in lines)      # progress
    token = next(r for r in ok if r["label"] == "token_l1_b32")
    assert token["scorer"] == "fitted indexer" and "recall" in token["unfitted"]

    # A torn last line (an interrupted append) is ignored; nothing finished is measured again.
    with (tmp_path / "results.jsonl").open("a") as f:
        f.write('{"key": "torn')
    calls = []
    monkeypatch.setattr("specgen.study.sweep.measure_task", lambda t: calls.append(t) or {})
    second = run_sweep(sweep, tmp_path, build=False, log=lambda s: None)
    assert second["ran"] == 0 and calls == []

    report = (tmp_path / "report.md").read_text()
    assert "## Headline" in report and "token_l1_b32" in report and "block_l8_b32" in report
    assert "not a whole number of selection blocks of 12" in report           # the invalid point and its reason
    assert "no GPU" in report
    assert "- **retrieval, T=64, 32 tokens** (oracle ceiling" in report        # the computed verdict
    data = json.loads((tmp_path / "results.json").read_text())
    assert len(data["fidelity"]) == 3 and {p["status"] for p in data["points"]} == {"valid", "invalid", "duplicate"}
    csv_text = (tmp_path / "results.csv").read_text()
    assert csv_text.splitlines()[0].startswith("part,") and csv_text.count("\nfidelity,") == 3
    if importlib.util.find_spec("matplotlib") is not None:
        assert (tmp_path / "plots" / "recall_budget.png").stat().st_size > 0
        assert (tmp_path / "plots" / "recall_time.png").stat().st_size > 0
    else:
        assert "matplotlib is not installed" in report


def test_build_task_loads_a_variant_and_reports_failures(tmp_path, monkeypatch):
    monkeypatch.setenv("SPECGEN_CACHE", str(tmp_path))
    point = next(p for p in expand(sweep_from_mapping(small_sweep())) if p.status == "valid")
    done = build_task(point.spec.to_dict())
    assert done["ok"] and done["hash"] == point.hash
    bad = build_task({**point.spec.to_dict(), "heads": {"q": 4, "kv": 3}})
    assert not bad["ok"] and bad["error"].startswith("heads.kv")


def test_speed_on_a_cpu_is_recorded_as_no_gpu():
    sweep = sweep_from_mapping(small_sweep())
    task = next(t for t in make_tasks(sweep, expand(sweep), "cpu") if t["part"] == "speed")
    rec = measure_task(task)
    assert rec["status"] == "skipped" and rec["speed"] == "no GPU"


def test_cli_dry_run_and_errors(tmp_path, capsys):
    path = tmp_path / "s.sweep.yaml"
    sweep = small_sweep()
    path.write_text(json.dumps(sweep))                            # JSON is YAML
    assert main(["sweep", str(path), "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "block_l12_b32" in out and "invalid" in out and "6 points, 3 valid" in out
    path.write_text(json.dumps({**sweep, "axes": {"selection.blok": [8]}}))
    assert main(["sweep", str(path)]) == 2
    assert "did you mean `selection.block`" in capsys.readouterr().err
    assert main(["sweep", str(tmp_path / "missing.yaml")]) == 2


@pytest.mark.parametrize("granularity", ["block", "token"])
def test_speed_plumbing_runs_the_generated_forward_and_backward(tmp_path, monkeypatch, granularity):
    """The GPU timing path, under the interpreter with the timers replaced by one call: the regime's inputs reach the
    generated forward (out=) and the differentiable entry point (backward), an indexer is fitted first. On a GPU
    machine the same plumbing runs on CUDA (`testing.test_device()`: the kernels refuse CPU inputs there)."""
    import triton

    from specgen import testing
    from specgen.perf import bench
    from specgen.study import sweep as sweep_mod
    from specgen.study.sweep import measure_speed

    monkeypatch.setenv("SPECGEN_CACHE", str(tmp_path))
    monkeypatch.setattr(bench, "_median_ms", lambda fn: (fn(), 1.0)[1])
    monkeypatch.setattr(triton.testing, "do_bench", lambda fn, **kw: (fn(), 2.0)[1])
    monkeypatch.setattr(sweep_mod, "_PEAKS", {})   # (CUDA: peaks measured with the fake timer, not kept after)
    sweep = sweep_from_mapping(small_sweep())
    point = next(p for p in expand(sweep) if p.status == "valid"
                 and p.spec.selection.granularity == granularity)
    # T = 16: the plumbing needs a sequence, not a long one (the interpreter runs a program per query, each call
    # twice: the warm-up and the replaced timer).
    row = measure_speed(point.spec, "structured", 16, {"dense": False, "backward": True},
                        {**sweep.fidelity, "fit_steps": 2}, device=testing.test_device())
    assert row["forward_ms"] == 1.0 and row["fwd_bwd_ms"] == 2.0 and row["forward_flops"] > 0


class _FakeRay:
    """Ray's API surface `_run_ray` uses (init, remote(...).options(...).remote, wait, get), run in-process and
    finishing tasks in reverse order, so the driver's handling of out-of-order results is exercised without Ray."""

    def __init__(self, dies=()):
        self.init_kwargs, self.options, self.dies = None, None, set(dies)

    def init(self, **kwargs):
        self.init_kwargs = kwargs

    def remote(self, fn):
        ray = self

        class _Remote:
            def options(self, **options):
                ray.options = options
                return self

            def remote(self, item):
                return ("ref", fn, item)

        return _Remote()

    def wait(self, pending, num_returns=1):
        return pending[-num_returns:], pending[:-num_returns]

    def get(self, ref):
        _, fn, item = ref
        if item.get("label") in self.dies:
            raise RuntimeError("The worker died unexpectedly while executing this task (fake)")
        return fn(item)


def test_ray_backend_dispatches_every_task_and_the_driver_writes_the_results(tmp_path, monkeypatch):
    import sys

    fake = _FakeRay()
    monkeypatch.setitem(sys.modules, "ray", fake)
    monkeypatch.setenv("RAY_ADDRESS", "auto")
    sweep = sweep_from_mapping(small_sweep(regimes=["retrieval"], fidelity={"fit_steps": 2, "train_T": 32,
                                                                             "train_batch": 1, "needles": 2}))
    counts = run_sweep(sweep, tmp_path, backend="ray", build=False, log=lambda s: None)
    assert counts["ran"] == 3 and counts["errors"] == 0
    assert fake.init_kwargs["address"] == "auto"
    assert fake.options == {"num_gpus": 0, "num_cpus": 1, "max_retries": 2,
                            "runtime_env": {"env_vars": {"TRITON_INTERPRET": "1"}}}
    ok = [r for r in read_records(tmp_path / "results.jsonl") if r["status"] == "ok"]
    assert sorted(r["label"] for r in ok) == ["block_l16_b32", "block_l8_b32", "token_l1_b32"]


# ---------------------------------------------------------------------------------------------------------------
# Process pools: GPU pinning, dead workers, tiny points on 2 CPU workers
# ---------------------------------------------------------------------------------------------------------------

def test_gpu_pool_pins_one_worker_per_gpu_and_never_shares_one(monkeypatch):
    """The assignment logic with a fake GPU list (physical ids 3 and 5, as CUDA_VISIBLE_DEVICES=3,5 would give):
    each worker holds one GPU for its life, each GPU one worker, and the points timed on a GPU never overlap."""
    from _pool_tasks import where

    from specgen.study import sweep as S

    assert S.gpu_slots(["3", "5", "6"], 2) == ["3", "5"]
    with pytest.raises(RuntimeError, match="names a GPU twice"):
        S.gpu_slots(["3", "3"], 2)
    monkeypatch.setattr(S, "_gpu_ids", lambda: ["3", "5"])
    got = []
    S._run_local(where, list(range(6)), 2, "cuda", got.append)
    assert sorted(r["item"] for r in got) == list(range(6))
    gpu_of = {}
    for r in got:
        assert gpu_of.setdefault(r["pid"], r["gpu"]) == r["gpu"]            # a worker keeps its GPU
    assert sorted(gpu_of.values()) == ["3", "5"]                            # one worker per GPU
    for gpu in ("3", "5"):
        spans = sorted((r["start"], r["end"]) for r in got if r["gpu"] == gpu)
        assert all(a[1] <= b[0] for a, b in zip(spans, spans[1:]))          # one point at a time on a GPU


def test_a_dead_workers_tasks_are_rerun_and_a_task_that_always_kills_it_is_recorded_failed(tmp_path):
    """2 CPU workers; `once` kills its process on the first attempt (BrokenProcessPool: the pool restarts and the
    unfinished tasks are resubmitted), `always` on every attempt (given up after the retries, with the reason);
    the other tasks, terminated with the broken pool, are re-run without being charged."""
    from _pool_tasks import dies

    from specgen.study.sweep import _run_local

    items = [(str(tmp_path), n) for n in ("a", "once", "b", "always", "c")]
    got, lines = [], []
    _run_local(dies, items, 2, "cpu", got.append, retries=1, log=lines.append,
               on_lost=lambda item, reason: ("lost", item[1], reason))
    lost = [r for r in got if isinstance(r, tuple)]
    assert sorted(r for r in got if isinstance(r, str)) == ["a", "b", "c", "once"]
    assert [r[1] for r in lost] == ["always"] and "worker process died" in lost[0][2]
    assert "BrokenProcessPool" in lost[0][2] and "2 attempts" in lost[0][2]
    assert (tmp_path / "once.died").exists() and any("restarting the pool" in line for line in lines)


@pytest.mark.parametrize("before", [None, "0"])
def test_an_in_process_run_sets_the_interpreter_for_its_duration_only(monkeypatch, before):
    """jobs=1 runs the tasks in the calling process, under init_worker's settings (TRITON_INTERPRET=1 on a CPU
    unless set); afterwards the variable is as it was. Left set, every module the process imported later was
    decorated for Triton's interpreter (on a GPU machine: ~80 later tests of one pytest worker failed)."""
    import os

    from specgen.study.sweep import _run_local

    if before is None:
        monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    else:
        monkeypatch.setenv("TRITON_INTERPRET", before)
    seen = []
    _run_local(lambda item: os.environ.get("TRITON_INTERPRET"), [1, 2], 1, "cpu", seen.append)
    assert seen == [before or "1"] * 2
    assert os.environ.get("TRITON_INTERPRET") == before

    def fails(item):
        raise ValueError("task failed")

    with pytest.raises(ValueError, match="task failed"):
        _run_local(fails, [1], 1, "cpu", seen.append)
    assert os.environ.get("TRITON_INTERPRET") == before


def test_sweep_on_two_cpu_workers_measures_tiny_points(tmp_path, monkeypatch):
    """The sweep's own process pool (spawned workers building and measuring) with 2 CPU workers on tiny points."""
    monkeypatch.setenv("SPECGEN_CACHE", str(tmp_path / "cache"))
    sweep = sweep_from_mapping(small_sweep(axes={"selection.block": [8, 16]}, regimes=["retrieval"],
                                           fidelity={"fit_steps": 2, "train_T": 32, "train_batch": 1,
                                                     "needles": 2}))
    counts = run_sweep(sweep, tmp_path / "out", jobs=2, build=False, log=lambda s: None)
    assert counts["ran"] == 2 and counts["errors"] == 0
    ok = [r for r in read_records(tmp_path / "out" / "results.jsonl") if r["status"] == "ok"]
    assert sorted(r["label"] for r in ok) == ["l16_b32", "l8_b32"] and all(r["host"] for r in ok)


def test_ray_task_that_fails_past_its_retries_is_recorded_with_the_reason(tmp_path, monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "ray", _FakeRay(dies={"block_l8_b32"}))
    monkeypatch.setattr("specgen.study.sweep.measure_task", lambda t: {
        **{k: t[k] for k in ("key", "label", "part", "regime", "seqlen")}, "status": "skipped", "speed": "fake"})
    sweep = sweep_from_mapping(small_sweep(regimes=["retrieval"]))
    counts = run_sweep(sweep, tmp_path, backend="ray", build=False, log=lambda s: None)
    assert counts["ran"] == 3 and counts["errors"] == 1
    (bad,) = [r for r in read_records(tmp_path / "results.jsonl") if r["status"] == "error"]
    assert bad["label"] == "block_l8_b32" and "Ray task failed after 2 retries" in bad["error"]


def test_a_speed_record_names_the_physical_gpu_and_host(monkeypatch):
    """CUDA_VISIBLE_DEVICES=5,7 and the process on its device 1: the record says GPU 7 (the physical index)."""
    import socket

    from specgen.study.sweep import gpu_identity

    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "5,7")
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 1)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda i=None: f"Fake GPU {i}")
    assert gpu_identity() == {"gpu": "7", "device": "Fake GPU 1", "host": socket.gethostname()}
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES")
    assert gpu_identity()["gpu"] == "1"


def test_ray_driver_without_a_gpu_sends_gpu_tasks_and_resumes(tmp_path, monkeypatch):
    """--device cuda --backend ray from a head node with no GPU: the tasks go to Ray (one GPU each), and a rerun
    counts a speed measurement made on any GPU as done (the driver cannot know which model its tasks get)."""
    import sys

    fake = _FakeRay()
    monkeypatch.setitem(sys.modules, "ray", fake)
    monkeypatch.setattr("specgen.study.sweep._gpu_ids", lambda: [])

    def fake_measure(t):
        rec = {**{k: t[k] for k in ("key", "label", "part", "regime", "seqlen")}, "status": "skipped", "speed": "x"}
        if t["part"] == "speed":
            rec["key"] = f"{t['key']}|Fake GPU"
        return {**rec, "status": "ok", "speed": {"forward_ms": 1.0}} if t["part"] == "speed" else rec

    monkeypatch.setattr("specgen.study.sweep.measure_task", fake_measure)
    monkeypatch.setattr("specgen.study.sweep.write_report", lambda out, **kw: {"report": out / "report.md"})
    sweep = sweep_from_mapping(small_sweep(regimes=["retrieval"], speed={"seqlens": [64], "regimes": ["random"]}))
    first = run_sweep(sweep, tmp_path, device="cuda", backend="ray", build=False, log=lambda s: None)
    assert first["ran"] == 6 and fake.options["num_gpus"] == 1
    again = run_sweep(sweep, tmp_path, device="cuda", backend="ray", build=False, log=lambda s: None)
    assert again["ran"] == 3                              # the fidelity records were "skipped": those run again
