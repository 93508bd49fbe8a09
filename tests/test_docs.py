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
