"""Shared by the tests in this folder."""

import pytest
import torch

@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny tensors: torch's intra-op threads only spin on 2 cores. One thread per test module, restored after."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
