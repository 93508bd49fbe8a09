"""bench/train_distributed.py on the CPU: 2 gloo ranks launched by torchrun (DistributedDataParallel; FSDP2
fully_shard with activation checkpointing) train a tiny model whose attention is a generated NSA layer, on packed
(varlen) batches, and their loss curves match the single-process run of the same global batch within 1e-5
(fp32). The three runs go concurrently (kernels under Triton's interpreter; tiny shapes, 3 steps)."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "bench" / "train_distributed.py"
TINY = """\
name: nsa_dist_tiny
family: nsa
heads: {q: 2, kv: 1}
head_dim: {qk: 16, v: 16}
dtype: fp16
kv: shared
compression: {block: 8, stride: 8, pool: mean}
selection: {block: 8, top_k: 2, initial: 1, local: 1}
window: {size: 8}
max_seqlen: 256
"""


def _script():
    spec = importlib.util.spec_from_file_location("train_distributed", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_compare_checks_the_problem_and_the_tolerance():
    compare = _script().compare
    args = {"family": "nsa", "spec": "s", "global_batch": 2, "seqlen": 16, "hidden": 16, "layers": 1, "vocab": 32,
            "lr": 1e-3, "seed": 0, "packed": False, "dtype": "fp32"}
    a = {"args": args, "loss": [3.0, 2.0]}
    assert compare(a, {"args": args, "loss": [3.0, 2.0 * (1 + 5e-6)]})["ok"]
    bad = compare(a, {"args": args, "loss": [3.0, 2.0 * (1 + 5e-5)]})
    assert not bad["ok"] and bad["step"] == 1 and bad["rtol"] == 1e-5
    assert compare(a, {"args": {**args, "dtype": "bf16"}, "loss": [3.0, 2.0 * (1 + 5e-3)]})["ok"]   # bf16: 1e-2
    assert compare(a, {"args": {**args, "seed": 1}, "loss": [3.0, 2.0]})["problems"] == ["seed: 0 vs 1"]


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU/gloo path; on a GPU host run the script by hand")
def test_ddp_and_fsdp2_on_two_gloo_ranks_match_the_single_process_run(tmp_path):
    import specgen

    spec = tmp_path / "nsa_dist_tiny.yaml"
    spec.write_text(TINY)
    specgen.load(spec)                        # build once here; the runs find it in the cache
    common = ["--spec", str(spec), "--hidden", "16", "--layers", "1", "--vocab", "32", "--seqlen", "16",
              "--global-batch", "2", "--steps", "3", "--packed"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TRITON_INTERPRET": "1",
           "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
    runs = {"single": [sys.executable, str(SCRIPT), "--single"],
            "ddp": [*torchrun, str(SCRIPT), "--mode", "ddp"],
            "fsdp": [*torchrun, str(SCRIPT), "--mode", "fsdp", "--checkpoint"]}
    procs = {name: subprocess.Popen([*cmd, *common, "--out", str(tmp_path / f"{name}.json")], env=env, cwd=ROOT,
                                    stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for name, cmd in runs.items()}
    for name, proc in procs.items():
        out, _ = proc.communicate(timeout=300)
        assert proc.returncode == 0, f"{name}:\n{out[-3000:]}"
    records = {name: json.loads((tmp_path / f"{name}.json").read_text()) for name in runs}
    single = records["single"]
    assert single["world_size"] == 1 and len(single["loss"]) == 3
    assert len(set(single["tokens_per_step"])) > 1                  # packed: random lengths per step
    compare = _script().compare
    for name in ("ddp", "fsdp"):
        rec = records[name]
        assert rec["world_size"] == 2 and rec["backend"] == "gloo" and rec["mode"] == name
        assert [r["rank"] for r in rec["ranks"]] == [0, 1] and rec["tokens_per_step"] == single["tokens_per_step"]
        result = compare(rec, single)
        assert result["ok"] and result["rtol"] == 1e-5, (name, result, rec["loss"], single["loss"])
