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


@pytest.fixture(autouse=True, scope="session")
def _private_specgen_cache(tmp_path_factory):
    """specgen.load builds into a temporary cache, never into the user's ~/.cache/specgen."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("SPECGEN_CACHE", str(tmp_path_factory.mktemp("specgen_cache")))
        yield
