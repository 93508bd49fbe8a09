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
