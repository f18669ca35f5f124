"""The user-facing documents: README.md within its length limit, and every relative link, image and repository path
that README.md, benchmarks/README.md and docs/*.md name exists (``path::test_name`` names a test in that file)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
DOCUMENTS = [REPO / "README.md", REPO / "benchmarks" / "README.md", *sorted((REPO / "docs").glob("*.md"))]
#: [text](target) and ![alt](target) links; the target up to a space, a '#' anchor or the closing parenthesis.
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s#]+)[^)]*\)")
#: `path` in backquotes naming a file or files of the repository, e.g. `tests/test_train.py::test_x` or `dir/*.json`.
REPO_PATH = re.compile(r"`((?:src|tests|training|benchmarks|docs)/[\w./*-]+\.\w+)(?:::(\w+))?`")
#: A result file named by benchmark, machine and date (``throughput_epyc-zen4-2core_2026-12-03.json``), or a glob.
RESULT_FILE = re.compile(r"[\w*-][\w*.-]*_\d{4}-\d{2}-\d{2}[\w.*-]*")  # dots inside: "7.5min", "tmin0.15"


def test_the_readme_is_at_most_300_lines():
    assert len((REPO / "README.md").read_text().splitlines()) <= 300


@pytest.mark.parametrize("document", DOCUMENTS, ids=lambda path: str(path.relative_to(REPO)))
def test_every_relative_link_and_image_resolves(document):
    targets = [target for target in LINK.findall(document.read_text()) if "://" not in target]
    assert targets or document.parent.name == "docs", f"{document} has no relative link: is the pattern still right?"
    missing = [target for target in targets if not (document.parent / target).exists()]
    assert not missing, f"{document.relative_to(REPO)} links to missing files: {missing}"


@pytest.mark.parametrize("document", DOCUMENTS, ids=lambda path: str(path.relative_to(REPO)))
def test_every_repository_path_in_backquotes_exists(document):
    missing = []
    for path, test_name in REPO_PATH.findall(document.read_text()):
        found = sorted(REPO.glob(path))
        if not found:
            missing.append(path)
        elif test_name and not re.search(rf"^def {test_name}\(", found[0].read_text(), re.MULTILINE):
            missing.append(f"{path}::{test_name}")
    assert not missing, f"{document.relative_to(REPO)} names paths that do not exist: {missing}"


@pytest.mark.parametrize("document", DOCUMENTS, ids=lambda path: str(path.relative_to(REPO)))
def test_every_result_file_named_is_in_benchmarks_results(document):
    names = set(RESULT_FILE.findall(document.read_text()))
    missing = sorted(name for name in names if not list((REPO / "benchmarks" / "results").glob(name.rstrip("."))))
    assert not missing, f"{document.relative_to(REPO)} names result files that do not exist: {missing}"


def test_the_documents_name_no_path_outside_the_repository():
    for document in DOCUMENTS:
        assert "../shared" not in document.read_text(), document
