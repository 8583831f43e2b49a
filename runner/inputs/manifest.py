"""NeMo JSONL manifests, streamed: one small `ManifestItem` at a time, never the whole file.

Accepted per line: a JSON object with `audio_filepath` (required; relative paths resolve
against the manifest's folder), and optional `duration` (read from the audio header when
missing), `offset`, `text`, `id`. Blank lines are skipped; a UTF-8 BOM and CRLF line ends are
accepted; `.gz` files are read compressed. A malformed line is a `ManifestError` that starts
with `file:line:`.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import stat
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO

from runner.errors import AudioLoadError, ManifestError


@dataclass(frozen=True)
class ManifestItem:
    id: str  # the manifest's `id`, else "L" + the line number: unique and stable per line
    audio_filepath: str  # absolute
    offset: float
    duration: float | None  # seconds; None when neither the manifest nor the header tells
    text: str | None  # reference transcript, when the manifest has one
    line: int


def open_text(path: Path) -> IO[str]:
    raw = gzip.open(path, "rb") if path.suffix == ".gz" else open(path, "rb")
    return io.TextIOWrapper(raw, encoding="utf-8-sig", newline=None)


def iter_manifest(path: str | os.PathLike, read_missing_durations: bool = True) -> Iterator[ManifestItem]:
    """Validated items in file order; raises `ManifestError` at the first malformed line."""
    path = Path(path)
    if not path.is_file():
        raise ManifestError(f"{path}: manifest not found")
    base = path.resolve().parent
    try:
        with open_text(path) as f:
            for number, line in enumerate(f, 1):
                if line.strip():
                    yield _parse(line, number, path, base, read_missing_durations)
    except UnicodeDecodeError as exc:
        raise ManifestError(f"{path}: not UTF-8 text ({exc.reason}); save the manifest as UTF-8") from None
    except (OSError, EOFError) as exc:
        if isinstance(exc, ManifestError):
            raise
        raise ManifestError(f"{path}: cannot read ({exc})") from None


def _parse(line: str, number: int, path: Path, base: Path, read_duration: bool) -> ManifestItem:
    where = f"{path}:{number}"
    try:
        row = json.loads(line)
    except json.JSONDecodeError as exc:
        raise ManifestError(
            f"{where}: invalid JSON ({exc.msg} at column {exc.colno}); each line must be one JSON object"
        ) from None
    if not isinstance(row, dict):
        raise ManifestError(f"{where}: expected a JSON object, got {type(row).__name__}")
    audio = row.get("audio_filepath")
    if not isinstance(audio, str) or not audio:
        raise ManifestError(f"{where}: missing `audio_filepath` (a non-empty string)")
    offset = _number(row, "offset", where, default=0.0)
    duration = _number(row, "duration", where, default=None)
    text = row.get("text")
    if text is not None and not isinstance(text, str):
        raise ManifestError(f"{where}: `text` must be a string, got {type(text).__name__}")
    ident = row.get("id")
    if ident is not None and (isinstance(ident, bool) or not isinstance(ident, (str, int)) or str(ident) == ""):
        raise ManifestError(f"{where}: `id` must be a non-empty string or integer, got {ident!r}")
    full = os.path.normpath(os.path.join(base, os.path.expanduser(audio)))
    if duration is None and read_duration:
        duration = _header_duration(full, offset)
    return ManifestItem(str(ident) if ident is not None else f"L{number:08d}", full, offset, duration, text, number)


def _number(row: dict, key: str, where: str, default):
    value = row.get(key)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0 or value != value:
        raise ManifestError(f"{where}: `{key}` must be a non-negative number of seconds, got {value!r}")
    return float(value)


def _header_duration(path: str, offset: float) -> float | None:
    """The duration the audio header tells, or None. A path that is not a regular file (a named pipe, a
    device, a socket) is not opened: opening a pipe without a writer would block the driver for ever; the
    worker meets it instead, under the shard's time limit."""
    from runner.inputs.audio import audio_info

    try:
        if not stat.S_ISREG(os.stat(path).st_mode):
            return None
    except OSError:
        return None  # missing or unreadable: the worker's read says why, in the item's error row
    try:
        return max(audio_info(path).duration - offset, 0.0)
    except AudioLoadError:
        return None  # the item becomes an error row when a worker reads it


def file_sha256(path: str | os.PathLike) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def check_unique_ids(items: Iterator[ManifestItem], path) -> Iterator[ManifestItem]:
    """Pass items through, raising `ManifestError` with both line numbers on a repeated id."""
    seen: dict[str, int] = {}
    for item in items:
        first = seen.setdefault(item.id, item.line)
        if first != item.line:
            raise ManifestError(
                f"{path}:{item.line}: duplicate id {item.id!r} (first on line {first}); ids must be unique"
            )
        yield item
