"""Tasks for the process-pool tests in test_sweep.py, in a module of their own: spawned workers unpickle them by
importing this module, which (unlike the test file) does not import torch, so a worker starts in a fraction of a
second."""

import os
import time
from pathlib import Path


def where(item):
    """A pool task: which process and which (fake) GPU ran it, and when."""
    start = time.time()
    time.sleep(0.2)
    return {"item": item, "pid": os.getpid(), "gpu": os.environ.get("CUDA_VISIBLE_DEVICES"), "start": start,
            "end": time.time()}


def dies(item):
    """A pool task that kills its own process: `once` on its first attempt only (a marker file says it happened),
    `always` on every attempt."""
    folder, name = item
    marker = Path(folder) / f"{name}.died"
    if name == "always" or (name == "once" and not marker.exists()):
        marker.write_text("x")
        os._exit(3)
    return name
