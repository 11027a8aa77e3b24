"""The tutorials run: each page's commands are executed and their output compared with the page
(tests/tutorials.py says how), and the documentation site builds with warnings as errors."""
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tutorials import ROOT, check_page, matches, steps

PAGES = sorted((ROOT / "docs" / "tutorials").glob("*.md"))


def test_matching_rules():
    assert matches(["a", "...", "d"], ["a", "b", "c", "d"])
    assert matches(["x ... z"], ["x y y z"]) and not matches(["x ... z"], ["x y"])
    assert matches(["..."], []) and matches(["a", "..."], ["a", "b"]) and not matches(["a"], ["a", "b"])
    assert not matches(["a", "...", "d"], ["a", "b"])


def test_every_tutorial_has_commands_and_is_in_the_site():
    nav = (ROOT / "mkdocs.yml").read_text()
    index = (ROOT / "docs" / "index.md").read_text()
    assert PAGES
    for page in PAGES:
        assert steps(page), f"{page.name} has no console block"
        assert f"tutorials/{page.name}" in nav and f"tutorials/{page.name}" in index, page.name


@pytest.fixture(scope="session")
def tutorial_home(tmp_path_factory):
    """One KILN_HOME for every page: the machine is calibrated once."""
    return tmp_path_factory.mktemp("tutorial_home")


@pytest.mark.slow
@pytest.mark.parametrize("page", PAGES, ids=[p.stem for p in PAGES])
def test_tutorial_runs_as_written(page, tmp_path, tutorial_home):
    check_page(page, tmp_path, tutorial_home)


@pytest.mark.slow
def test_docs_site_builds_strict(tmp_path):
    mkdocs = Path(sys.executable).parent / "mkdocs"
    if not mkdocs.exists():
        pytest.skip("mkdocs is not installed: `make docs` installs it")
    proc = subprocess.run([str(mkdocs), "build", "--strict", "--site-dir", str(tmp_path / "site")],
                          cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (tmp_path / "site" / "tutorials" / "analysis" / "index.html").exists()
    shutil.rmtree(tmp_path / "site")
