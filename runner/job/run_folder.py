"""The run directory: `job.json`, Parquet parts written atomically, `stats.json`, `_SUCCESS`;
for int8 jobs `quantization.json` and `int8-model.pt` (the artifact every part was made with);
`.asr-runner.lock`, held by the driver at work.

Only the driver writes here. Workers send their rows back through Ray's object store, so a
cluster needs no shared filesystem: the output directory only has to exist on the driver's
machine (or be a mount the driver can write). A part is written to a temporary name in the
same folder, flushed to disk, then renamed: a part file that exists is complete.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import re
import socket
import sys
import tempfile
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from runner.errors import InputError

WORD = pa.struct([("word", pa.string()), ("start", pa.float64()), ("end", pa.float64()), ("confidence", pa.float64())])
SPAN = pa.struct([("start", pa.float64()), ("end", pa.float64()), ("cut", pa.string())])
SCHEMA = pa.schema(
    [
        ("id", pa.string()),
        ("audio_filepath", pa.string()),
        ("offset", pa.float64()),
        ("duration", pa.float64()),
        ("text", pa.string()),
        ("reference", pa.string()),
        ("status", pa.string()),  # ok | error
        ("error", pa.string()),
        ("shard", pa.int32()),
        # `timestamps: true` (else null): each word of `text` with its start and end in seconds of the
        # audio file (`offset` included) and a confidence in [0, 1]; `confidence`: the utterance's.
        ("words", pa.list_(WORD)),
        ("confidence", pa.float64()),
        # a line longer than `split_seconds`: the segments it was transcribed in, seconds in the audio file
        # (`offset` included), and how each ends: pause | forced (no pause near the target) | end; else null
        ("segments", pa.list_(SPAN)),
    ]
)

JOB_FILE, STATS_FILE, SUCCESS_FILE, PARTS_DIR = "job.json", "stats.json", "_SUCCESS", "transcripts"
DIGEST_KEY = b"asr_runner_rows_sha256"  # footer metadata: sha256 of the part's rows
META_KEY = b"asr_runner"  # footer metadata: who made the part (worker, engine, stage seconds), JSON
PART_NAME = re.compile(r"part-(\d{5,})\.parquet")
QUANTIZATION_FILE = "quantization.json"  # int8 runs: the artifact's report (gate, sensitivity, engines)
ARTIFACT_FILE = "int8-model.pt"  # int8 runs: the artifact every part was made with (a resume uses it)
LOCK_FILE = ".asr-runner.lock"  # held by the running driver


def part_path(out: Path, shard: int) -> Path:
    return out / PARTS_DIR / f"part-{shard:05d}.parquet"


def write_atomic(path: Path, data: bytes) -> None:
    """Write bytes to a temporary file beside `path`, fsync, then rename over it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        _remove_quietly(tmp)
        raise


def write_json(path: Path, data: Any) -> None:
    write_atomic(path, (json.dumps(data, indent=2, sort_keys=False) + "\n").encode())


def write_part(out: Path, shard: int, rows: list[dict], metadata: dict | None = None) -> Path:
    """Write one shard's rows as `transcripts/part-NNNNN.parquet`, atomically, with page CRCs and a
    digest of its rows in the footer (`part_is_valid` checks both)."""
    return write_checked(part_path(out, shard), pa.Table.from_pylist(rows, schema=SCHEMA), metadata)


def write_checked(path: Path, table: pa.Table, metadata: dict | None = None) -> Path:
    """`table` as Parquet at `path`, atomically, with page CRCs and, in the footer, the digest of its rows
    (`rows_digest`) and `metadata` (JSON under META_KEY); parts and a split line's segment files alike."""
    meta = {DIGEST_KEY: rows_digest(table).encode()}
    if metadata:
        meta[META_KEY] = json.dumps(metadata).encode()
    sink = pa.BufferOutputStream()
    pq.write_table(table.replace_schema_metadata(meta), sink, compression="zstd", write_page_checksum=True)
    write_atomic(path, sink.getvalue().to_pybytes())
    return path


def read_part(path: Path, columns: list[str] | None = None) -> pa.Table:
    return pq.read_table(path, schema=SCHEMA, columns=columns)


def part_is_valid(path: Path, shard: int, expected_rows: int) -> bool:
    """A part counts as done when it reads in full (footer; every page against its CRC-32), its rows
    match the digest written with them, it holds the shard's row count and only rows of this shard.
    Anything else - a file cut short, bytes flipped on disk, a part of another plan - means the shard
    is recomputed."""
    try:
        footer = pq.ParquetFile(path)
        if footer.metadata.num_rows != expected_rows:
            return False
        digest = (footer.schema_arrow.metadata or {}).get(DIGEST_KEY, b"").decode()
        table = pq.read_table(path, schema=SCHEMA, page_checksum_verification=True)
    except Exception:  # noqa: BLE001 - any read failure means "not a finished part"
        return False
    return (
        table.num_rows == expected_rows and set(table["shard"].to_pylist()) <= {shard} and digest == rows_digest(table)
    )


def rows_digest(table: pa.Table) -> str:
    """SHA-256 of a table's rows (its own schema's columns, in order) as sorted-key JSON."""
    rows = table.select(table.schema.names).to_pylist()
    return hashlib.sha256(json.dumps(rows, ensure_ascii=False, sort_keys=True).encode()).hexdigest()


def existing_parts(out: Path) -> dict[int, Path]:
    folder = out / PARTS_DIR
    if not folder.is_dir():
        return {}
    parts = {}
    for path in folder.glob("part-*.parquet"):
        match = PART_NAME.fullmatch(path.name)
        # exactly the name `part_path` gives: `part-1.parquet` or `part-00001-copy.parquet` are not ours
        if match and path.name == part_path(out, int(match[1])).name:
            parts[int(match[1])] = path
    return parts


def remove_stale_temporaries(out: Path) -> None:
    """Leftovers of an interrupted write (our own `.part-*.tmp` names only)."""
    folder = out / PARTS_DIR
    if folder.is_dir():
        for tmp in folder.glob(".part-*.parquet.*.tmp"):
            _remove_quietly(str(tmp))


def read_rows(out: Path, columns: Iterable[str] | None = None) -> pa.Table:
    """All rows of a run: the parts of the shards its `job.json` plans (other files are not ours)."""
    planned = _planned_shards(out)
    parts = sorted((i, p) for i, p in existing_parts(out).items() if planned is None or i < planned)
    tables = [pq.read_table(p, columns=list(columns) if columns else None) for _, p in parts]
    return pa.concat_tables(tables) if tables else SCHEMA.empty_table()


def _planned_shards(out: Path) -> int | None:
    try:
        return len(json.loads((out / JOB_FILE).read_text())["plan"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


@contextmanager
def driver_lock(out: Path) -> Iterator[None]:
    """Hold the output directory for one driver: an exclusive `flock` on `OUT/.asr-runner.lock`.

    The kernel drops the lock when the holder exits, however it exits (a SIGKILLed driver too), so
    a stale lock never blocks `--resume`; the file itself stays (it only says who held it last).
    The descriptor is not inherited, so the Ray processes a driver starts never hold it.
    A second driver gets `InputError` (exit 2) naming the one at work.
    """
    out.mkdir(parents=True, exist_ok=True)
    path = out / LOCK_FILE
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        holder = os.pread(fd, 4096, 0).decode(errors="replace").strip()
        os.close(fd)
        try:
            who = "pid {pid} on {host}, started {started}: {command}".format(**json.loads(holder))
        except (ValueError, KeyError, TypeError):
            who = "details not written yet"
        raise InputError(
            f"{out} is in use by another asr-runner driver ({who}); wait for it to finish or stop it, "
            "then run again (with --resume to continue its job)"
        ) from None
    try:
        os.ftruncate(fd, 0)
        os.pwrite(
            fd,
            json.dumps(
                {
                    "pid": os.getpid(),
                    "host": socket.gethostname(),
                    "started": time.strftime("%Y-%m-%d %H:%M:%S %z"),
                    "command": " ".join(sys.argv),
                }
            ).encode()
            + b"\n",
            0,
        )
        yield
    finally:
        os.close(fd)  # releases the lock


def _remove_quietly(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
