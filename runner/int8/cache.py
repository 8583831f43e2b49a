"""The driver's cache of int8 artifacts and lean fp32 checkpoints.

An artifact is keyed by what it was made from: the model's bytes, the manifests' bytes, the
settings, torch's version, the recipe version, the quantization code's version (`code_version`)
and the audio its samples read (each candidate's path, segment, size and mtime). The artifact's
report records these inputs (`report["inputs"]`) and a cached artifact is used only when its
record matches: anything else is quantized again and overwritten. `runner.int8.pipeline` draws the
samples and makes the artifact; this module only keys, finds and stores.
"""

from __future__ import annotations

import functools
import hashlib
import io
import json
import logging
import os
import stat
from collections.abc import Sequence
from pathlib import Path

from runner.errors import InputError
from runner.inputs.manifest import ManifestItem, file_sha256
from runner.int8 import artifact as artifact_io
from runner.int8.artifact import Artifact
from runner.int8.report import QuantizationReport
from runner.model.ctc import load_checkpoint, save_checkpoint
from runner.model.nemo_loader import load_any

log = logging.getLogger(__name__)

SOURCE_DIR = Path(__file__).resolve().parents[1]  # the runner package, whose code `code_version` hashes
# What decides an artifact's contents: the model, int8 and inputs layers (a new module in them included)
# and the shared modules they use. Jobs, the command line, training tooling and this cache module cannot
# change what an artifact holds, so editing them keeps the cache.
ARTIFACT_CODE = ("model/*.py", "int8/*.py", "inputs/*.py", "metrics.py", "sysinfo.py")
NOT_ARTIFACT_CODE = frozenset({"__init__.py", "int8/cache.py"})
RECORDED_FILES = 1000  # audio files listed in an artifact's record (the digest covers them all)


def cache_dir() -> Path:
    """ASR_RUNNER_CACHE, else $XDG_CACHE_HOME/asr-runner, else ~/.cache/asr-runner."""
    if os.environ.get("ASR_RUNNER_CACHE"):
        return Path(os.environ["ASR_RUNNER_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "asr-runner"


def code_version() -> str:
    """sha256 over the source of the runner modules that decide what an artifact holds (once per process)."""
    return _code_version(str(SOURCE_DIR))


@functools.cache
def _code_version(folder: str) -> str:
    digest = hashlib.sha256()
    root = Path(folder)
    paths = sorted({p for pattern in ARTIFACT_CODE for p in root.glob(pattern)})
    for path in paths:
        name = path.relative_to(root).as_posix()
        if name not in NOT_ARTIFACT_CODE and path.name != "__init__.py":
            digest.update(f"{name}\0{path.stat().st_size}\0".encode())
            digest.update(path.read_bytes())
    return digest.hexdigest()


def audio_entry(item: ManifestItem) -> list:
    """[path, offset, duration, size, mtime_ns] of an item's audio; a marker instead of size and mtime
    when the file is missing, unreadable or not a regular file (stat only: a FIFO is never opened)."""
    head = [item.audio_filepath, item.offset, item.duration]
    try:
        st = os.stat(item.audio_filepath)
    except OSError as exc:
        return head + [f"unreadable: {exc.strerror}"]
    if not stat.S_ISREG(st.st_mode):
        return head + ["not a regular file"]
    return head + [st.st_size, st.st_mtime_ns]


def inputs_record(
    model_sha256: str,
    manifests: dict,
    settings: dict,
    recipe_version: int,
    calibration: Sequence[ManifestItem],
    gate: Sequence[ManifestItem],
) -> dict:
    """What an artifact is made from, with its cache key: `report["inputs"]` of the artifact."""
    import torch

    audio = {"calibration": [audio_entry(i) for i in calibration], "gate": [audio_entry(i) for i in gate]}
    audio_sha256 = hashlib.sha256(json.dumps(audio).encode()).hexdigest()
    parts = {
        "recipe": recipe_version,
        "model": model_sha256,
        "manifests": manifests,
        "settings": settings,
        "torch": str(torch.__version__),
        "code": code_version(),
        "audio": audio_sha256,
    }
    files: dict[str, list] = {}
    for entry in audio["calibration"] + audio["gate"]:
        if len(files) < RECORDED_FILES:
            files.setdefault(entry[0], [entry[0], *entry[3:]])
    return {
        "cache_key": hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest(),
        "model_sha256": model_sha256,
        "code_version": parts["code"],
        "recipe_version": recipe_version,
        "torch": parts["torch"],
        "manifests": manifests,
        "audio_sha256": audio_sha256,
        "audio_items": len(audio["calibration"]) + len(audio["gate"]),
        "audio": list(files.values()),
    }


def artifact_path(key: str) -> Path:
    return cache_dir() / f"int8-{key[:32]}.pt"


def cached_artifact(inputs: dict) -> tuple[bytes, QuantizationReport] | None:
    """The cached artifact made from `inputs` and its report, checked against its own record; None when there
    is none, it is damaged, or it was made from other inputs."""
    path = artifact_path(inputs["cache_key"])
    if not path.is_file():
        return None
    data = path.read_bytes()
    try:
        report = Artifact.from_bytes(data, str(path)).report
    except InputError:
        log.warning("ignoring a damaged cached artifact %s", path)
        return None
    made_from = report.inputs
    if any(made_from.get(k) != inputs[k] for k in ("cache_key", "model_sha256")):
        log.warning(
            "ignoring the cached artifact %s: its record says it was made from other inputs "
            "(key %s, model %s); quantizing again",
            path,
            str(made_from.get("cache_key"))[:12],
            str(made_from.get("model_sha256"))[:12],
        )
        return None
    log.info("int8 artifact from the cache: %s", path)
    return data, report


def store_artifact(data: bytes, inputs: dict) -> None:
    artifact_io.save(data, artifact_path(inputs["cache_key"]))


# --------------------------------------------------------------------------- lean fp32 checkpoints
def fp32_cache_path(model_path: str, model_sha256: str | None = None, decoder: str | None = None) -> Path:
    """The lean fp32 checkpoint's place in the cache (a hybrid model's chosen head: its own file)."""
    return cache_dir() / f"fp32-{(model_sha256 or file_sha256(model_path))[:32]}{'-' + decoder if decoder else ''}.pt"


def save_fp32_checkpoint(model, path: Path) -> bytes:
    buf = io.BytesIO()
    save_checkpoint(model.spec, model.state_dict(), buf)
    artifact_io.save(buf.getvalue(), path)
    return buf.getvalue()


def fp32_checkpoint(model_path: str, decoder: str | None = None) -> bytes:
    """The lean fp32 checkpoint of a model (loads without NeMo), for workers whose int8 fails its
    self-check: cached beside the artifacts, so a job with a cached artifact does not load NeMo."""
    path = fp32_cache_path(model_path, decoder=decoder)
    if path.is_file():
        data = path.read_bytes()
        try:
            load_checkpoint(io.BytesIO(data))
            return data
        except Exception:  # noqa: BLE001 - a damaged cache entry is rebuilt
            log.warning("ignoring a damaged cached fp32 checkpoint %s", path)

    return save_fp32_checkpoint(load_any(model_path, decoder), path)
