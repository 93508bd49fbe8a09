"""The README's spec reference table is generated from the schema; it must be current."""

from pathlib import Path

from specgen.docs import END, START, spec_table

ROOT = Path(__file__).resolve().parent.parent


def test_readme_spec_table_is_current():
    text = (ROOT / "README.md").read_text()
    section = text.split(START, 1)[1].split(END, 1)[0]
    assert section.strip() == spec_table().strip(), "run `python -m specgen.docs` and commit README.md"


def test_semantics_copy_matches_shared_rules_when_available():
    shared = ROOT.parent / "shared" / "docs" / "semantics.md"
    if shared.exists():
        assert (ROOT / "docs" / "semantics.md").read_text() == shared.read_text()


def test_readme_benchmark_table_is_what_the_results_files_give():
    import importlib.util

    spec = importlib.util.spec_from_file_location("plot_results", ROOT / "bench" / "plot_results.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert module.main(["--check"]) == 0, "run `python bench/plot_results.py` and commit README.md"


# Every reference in the project resolves inside the project: relative markdown links, `docs/*.md` mentions, and no
# path outside the repository.
TEXT_SUFFIXES = {".md", ".py", ".j2", ".yaml", ".toml", ".txt", ".sh", ".cfg"}
SKIP_DIRS = {".git", "__pycache__", ".pytest_cache", "results"}   # bench/results: logs and records, not prose


def _project_text_files():
    for path in sorted(ROOT.rglob("*")):
        rel = path.relative_to(ROOT)
        if path.is_file() and path.suffix in TEXT_SUFFIXES and not SKIP_DIRS.intersection(rel.parts[:-1]) \
                and not any(part.startswith(".") for part in rel.parts):
            yield path, rel


def test_every_relative_markdown_link_resolves():
    import re

    broken = []
    for path, rel in _project_text_files():
        if path.suffix != ".md":
            continue
        for target in re.findall(r"\]\(([^)\s]+)\)", path.read_text()):
            if re.match(r"[a-z][a-z0-9+.-]*:", target) or target.startswith("#"):
                continue                                                  # a URL or an anchor in the same page
            if not (path.parent / target.split("#", 1)[0]).exists():
                broken.append(f"{rel}: ({target})")
    assert not broken, "links to files that do not exist:\n" + "\n".join(broken)


def test_every_docs_mention_names_a_project_doc():
    import re

    missing, outside = [], []
    for path, rel in _project_text_files():
        text = path.read_text(errors="replace")
        for name in set(re.findall(r"(?<![\w/.-])docs/([\w.-]+\.md)", text)):
            if not (ROOT / "docs" / name).is_file():
                missing.append(f"{rel}: docs/{name}")
        if rel != Path("tests") / "test_docs.py":
            outside += [f"{rel}: {m}" for m in set(re.findall(r"(?:/work/|\bshared/docs/)\S*", text))]
    assert not missing, "mentions of docs the project does not have:\n" + "\n".join(sorted(missing))
    assert not outside, "references outside the project:\n" + "\n".join(sorted(outside))
