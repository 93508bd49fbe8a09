"""The interpreter bounds plugin (specgen.testing.bounds) catches a store past a tensor's end."""

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

PROBE = '''
import torch, triton, triton.language as tl

@triton.jit
def k(X, N):
    i = tl.arange(0, 16)
    tl.store(X + i, i.to(tl.float32), mask=i < N)

def test_in_bounds():
    x = torch.zeros(8)
    k[(1,)](x, 8)

def test_out_of_bounds():
    x = torch.zeros(8)
    k[(1,)](x, 16)
'''


def test_the_plugin_fails_only_the_out_of_bounds_store(tmp_path):
    probe = tmp_path / "test_probe.py"
    probe.write_text(PROBE)
    env = {**os.environ, "TRITON_INTERPRET": "1",
           "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    out = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "specgen.testing.bounds",
                          str(probe)], capture_output=True, text=True, env=env, cwd=tmp_path)
    assert "1 failed, 1 passed" in out.stdout, out.stdout[-2000:]
    assert "OOB store in k: 8 of 16 addresses" in out.stdout
