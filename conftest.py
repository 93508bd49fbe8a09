"""Without a GPU, Triton kernels run under its CPU interpreter: set it before any kernel is decorated."""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

if os.environ.get("TRITON_INTERPRET") == "1":
    # The interpreter's sorts reduce with a Python loop per element; an exact numpy reduction instead
    # (specgen/testing/interpreter.py).
    from specgen.testing import interpreter

    interpreter.install()


def pytest_runtest_logreport(report):
    """SPECGEN_INSTAFAIL=1 (the GPU suite's calls, bench/gpu_suite.sh): a failing test's traceback is printed as it
    fails, not in pytest's summary at the end, which a device call cut by its time limit never reaches."""
    if report.failed and os.environ.get("SPECGEN_INSTAFAIL") == "1":
        print(f"\n--- {report.nodeid} ({report.when}) failed:\n{report.longreprtext[-4000:]}\n---", flush=True)
