"""The test ids a cut-off GPU suite call left without a pass, for the next call's IDS file.

    python bench/gpu_suite_left.py IDS_FILE LOG [LOG ...] > left.txt
    python bench/gpu_suite_left.py --failed LOG > failed.txt     (the ids whose last verdict in LOG is a failure)

IDS_FILE lists the ids the call meant to run (``pytest --collect-only -q -m skipif generated tests``); each LOG is a
verbose pytest log the call brought back (bench/gpu_suite.sh). An id counts as done once any log says it PASSED or
SKIPPED; a failure in the last log that ran it is not done (it goes in the list again for a one-at-a-time rerun).
"""

import re
import sys

WORDS = "PASSED|SKIPPED|XFAIL|XPASS|FAILED|ERROR"
# Line by line, so that ids holding spaces ("[import triton-triton was imported ...]") are read whole.
XDIST = re.compile(rf"^\[gw\d+\] \[\s*\d+%\] ({WORDS}) (\S+::.+?)\s*$")
SERIAL = re.compile(rf"^(\S+::.+?) ({WORDS})(?:\s+\[\s*\d+%\])?\s*$")


def verdicts(text: str) -> dict:
    """The last verdict a verbose log gives each test id (xdist writes "[gw0] [ 3%] PASSED id", serial
    "id PASSED [ 3%]")."""
    out = {}
    for line in text.splitlines():
        m = XDIST.match(line)
        if m:
            out[m.group(2)] = m.group(1)
            continue
        m = SERIAL.match(line)
        if m:
            out[m.group(1)] = m.group(2)
    return out


def left(ids: list, logs: list) -> list:
    done = set()
    for text in logs:
        done |= {node for node, word in verdicts(text).items() if word in ("PASSED", "SKIPPED", "XFAIL")}
    return [i for i in ids if i not in done]


def main(argv: list) -> int:
    if len(argv) == 2 and argv[0] == "--failed":
        with open(argv[1], errors="replace") as f:
            for node, word in verdicts(f.read()).items():
                if word in ("FAILED", "ERROR"):
                    print(node)
        return 0
    if len(argv) < 2:
        print(__doc__, file=sys.stderr)
        return 2
    with open(argv[0]) as f:
        ids = [line.strip() for line in f if "::" in line]
    logs = []
    for path in argv[1:]:
        with open(path, errors="replace") as f:
            logs.append(f.read())
    for node in left(ids, logs):
        print(node)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
