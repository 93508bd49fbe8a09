"""bench/gpu_suite_left.py: which GPU-suite tests a cut-off call left, read from verbose pytest logs."""

import importlib.util
from pathlib import Path

_spec = importlib.util.spec_from_file_location("gpu_suite_left",
                                               Path(__file__).parents[1] / "bench" / "gpu_suite_left.py")
left_mod = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(left_mod)

XDIST_LOG = """\
[gw0] [ 10%] PASSED generated/test_a.py::test_x[8192]
[gw1] [ 20%] FAILED generated/test_a.py::test_y[paged-1]
[gw1] [ 30%] SKIPPED tests/test_r.py::test_z[import triton-triton was imported before specgen]
FAILED generated/test_a.py::test_y[paged-1] - torch.OutOfMemoryError
"""
SERIAL_LOG = """\
generated/test_a.py::test_y[paged-1] PASSED                              [ 50%]
generated/test_a.py::test_w # exit status 124
"""


def test_verdicts_read_xdist_and_serial_lines_and_ids_with_spaces():
    v = left_mod.verdicts(XDIST_LOG)
    assert v == {"generated/test_a.py::test_x[8192]": "PASSED", "generated/test_a.py::test_y[paged-1]": "FAILED",
                 "tests/test_r.py::test_z[import triton-triton was imported before specgen]": "SKIPPED"}
    assert left_mod.verdicts(SERIAL_LOG) == {"generated/test_a.py::test_y[paged-1]": "PASSED"}


def test_left_drops_what_any_log_passed_and_keeps_failures_and_unrun():
    ids = ["generated/test_a.py::test_x[8192]", "generated/test_a.py::test_y[paged-1]",
           "generated/test_a.py::test_w", "tests/test_r.py::test_z[import triton-triton was imported before specgen]"]
    assert left_mod.left(ids, [XDIST_LOG]) == ["generated/test_a.py::test_y[paged-1]", "generated/test_a.py::test_w"]
    assert left_mod.left(ids, [XDIST_LOG, SERIAL_LOG]) == ["generated/test_a.py::test_w"]


def test_failed_mode_prints_the_failures(tmp_path, capsys):
    log = tmp_path / "a.log"
    log.write_text(XDIST_LOG)
    assert left_mod.main(["--failed", str(log)]) == 0
    assert capsys.readouterr().out.split("\n")[:-1] == ["generated/test_a.py::test_y[paged-1]"]
