"""Without a GPU, Triton kernels run under its CPU interpreter: set it before any kernel is decorated."""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
