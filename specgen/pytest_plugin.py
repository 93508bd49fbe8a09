"""A pytest plugin (registered by the package's `pytest11` entry point) for generated test files run outside this
repository: it declares the `gpu` marker they use, so a user's own pytest run neither warns nor, under
`--strict-markers`, fails on it."""


def pytest_configure(config) -> None:
    config.addinivalue_line("markers", "gpu: needs a CUDA GPU; realistic sizes in bf16 (skipped with the reason on a CPU)")
