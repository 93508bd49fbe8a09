"""Generated parts of the README (the spec reference table), so the docs cannot drift from the schema.

`python -m specgen.docs` rewrites the marked section of README.md; tests/test_docs.py fails when it is stale.
"""

from __future__ import annotations

import sys
from pathlib import Path

from .model.spec import field_reference

START, END = "<!-- spec-table:start (python -m specgen.docs) -->", "<!-- spec-table:end -->"


def spec_table() -> str:
    rows = ["| field | default | allowed | meaning |", "|---|---|---|---|"]
    for path, default, allowed, doc in field_reference():
        if allowed == "section":
            rows.append(f"| **`{path}`** | | section | {doc} |")
        else:
            rows.append(f"| `{path}` | `{default}` | {allowed} | {doc} |")
    return "\n".join(rows)


def refresh(readme: Path) -> bool:
    text = readme.read_text()
    head, _, rest = text.partition(START)
    _, _, tail = rest.partition(END)
    new = f"{head}{START}\n{spec_table()}\n{END}{tail}"
    if new != text:
        readme.write_text(new)
        return True
    return False


if __name__ == "__main__":
    changed = refresh(Path(sys.argv[1] if len(sys.argv) > 1 else "README.md"))
    print("README.md updated" if changed else "README.md up to date")
