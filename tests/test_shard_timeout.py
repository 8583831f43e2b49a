"""Issue 16, item 7: a hung read (a named pipe without a writer, a mount that stopped answering) must not
stall a job for ever.

The driver never opens a file that is not a regular one while planning; a worker that does hangs
until its shard's time limit (`shard_timeout_seconds`), is replaced, and the shard is sent again one
item per call, so that only the hanging item becomes an error row. The job runs in a subprocess with
a timeout: a regression fails the test instead of hanging the suite.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from runner.inputs.manifest import ManifestItem, iter_manifest
from runner.job.run_folder import read_rows
from runner.job.shard_pool import audio_seconds
from runner.job.shards import Shard
from runner.job.spec import DEMO_MODEL, SpecError, load_spec, time_limit

from .support import write_manifest, write_spec

pytestmark = pytest.mark.slow

JOB_LIMIT_SECONDS = 150  # measured 46 s on 2 cores (28 s of it starting Ray and workers); else it never ends


def kill_session(sid: int) -> None:
    """SIGKILL every process of session `sid` (Ray's workers have process groups of their own)."""
    for entry in Path("/proc").iterdir():
        try:
            if entry.name.isdigit() and os.getsid(int(entry.name)) == sid:
                os.kill(int(entry.name), signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass


@pytest.mark.parametrize(
    "value,expected", [(None, "auto"), ("auto", "auto"), (30, 30), (0.5, 0.5), ("null", None), ("~", None)]
)
def test_shard_timeout_seconds_key(tmp_path, value, expected):
    extra = {} if value is None else {"shard_timeout_seconds": value}
    spec = load_spec(write_spec(tmp_path / "job.yaml", model="m.nemo", manifest="m.jsonl", output="out", **extra))
    assert spec.shard_timeout_seconds == expected


@pytest.mark.parametrize("value", [0, -5, "fast", "'30'", "true", ".inf", ".nan", "[30]"])
def test_bad_shard_timeout_seconds_is_a_one_line_error_naming_the_key(tmp_path, value):
    path = write_spec(
        tmp_path / "job.yaml", model="m.nemo", manifest="m.jsonl", output="out", shard_timeout_seconds=value
    )
    with pytest.raises(SpecError, match=r"job.yaml: shard_timeout_seconds must be auto, a positive number") as err:
        load_spec(path)
    assert "\n" not in str(err.value)


def test_auto_time_limit_asks_for_half_real_time_plus_a_base():
    assert time_limit("auto", 600.0) == 120 + 2 * 600
    assert time_limit("auto", 0.0) == 120
    assert time_limit(5, 600.0) == 5.0 and time_limit(None, 600.0) is None

    def item(n, duration):
        return ManifestItem(f"L{n}", f"/a/{n}.wav", 0.0, duration, None, n)

    # Durations from the manifest: the shard's and each item's own.
    known = [item(1, 10.0), item(2, 20.0)]
    assert audio_seconds(Shard(0, 1, 2, 2, 30.0), known) == (30.0, [10.0, 20.0])
    # No duration in the manifest, but the plan read 50 s from the headers: that bounds the unknown item.
    mixed = [item(1, 10.0), item(2, None)]
    assert audio_seconds(Shard(0, 1, 2, 2, 60.0), mixed) == (60.0, [10.0, 60.0])
    assert audio_seconds(Shard(0, 1, 2, 2, 110.0), mixed) == (110.0, [10.0, 100.0])
    # Nothing read for it (a named pipe, a path only the workers see): 60 s.
    assert audio_seconds(Shard(0, 1, 2, 2, 10.0), mixed) == (70.0, [10.0, 60.0])


def test_planning_does_not_open_a_named_pipe(tmp_path):
    """On the code before issue 16 reading the header of a pipe without a writer blocked the driver for ever."""
    pipe = tmp_path / "pipe.wav"
    os.mkfifo(pipe)
    manifest = write_manifest(tmp_path / "m.jsonl", [{"audio_filepath": str(pipe)}])
    items = []
    reader = threading.Thread(target=lambda: items.extend(iter_manifest(manifest)), daemon=True)
    reader.start()
    reader.join(10)
    if reader.is_alive():  # free the thread: a writer that closes at once gives the reader end-of-file
        os.close(os.open(pipe, os.O_WRONLY | os.O_NONBLOCK))
    assert not reader.is_alive() and [i.duration for i in items] == [None]


def test_a_named_pipe_in_the_manifest_becomes_an_error_row_and_the_job_ends(speech_files, tmp_path, reliability):
    pipe = tmp_path / "pipe.wav"
    os.mkfifo(pipe)  # no writer, ever: a worker that opens it blocks, as on a mount that stopped answering
    rows = [{"audio_filepath": path, "text": text} for text, path in speech_files[:10]]
    rows.insert(5, {"audio_filepath": str(pipe), "text": "never heard"})  # no duration: the driver must not read it
    manifest = write_manifest(tmp_path / "manifest.jsonl", rows)
    out = tmp_path / "out"
    spec = write_spec(
        tmp_path / "job.yaml",
        model=DEMO_MODEL,
        manifest=manifest,
        output=out,
        shard_seconds=8,
        max_failed=1,
        shard_timeout_seconds=5,
    )
    t0 = time.monotonic()
    driver = subprocess.Popen(
        [sys.executable, "-m", "runner.cli", "--quiet", "run", str(spec)],
        start_new_session=True,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        _, err = driver.communicate(timeout=JOB_LIMIT_SECONDS)
    except subprocess.TimeoutExpired:
        err = None
    finally:
        kill_session(driver.pid)  # the driver and the Ray processes it started, still hung if the limit failed
        driver.wait()
    seconds = time.monotonic() - t0
    assert err is not None, f"the job did not end within {JOB_LIMIT_SECONDS} s: a hung read stalled it"
    assert driver.returncode == 0, err[-3000:]

    table = read_rows(out).to_pylist()
    ids = [item.id for item in iter_manifest(manifest)]
    assert sorted(r["id"] for r in table) == sorted(ids) and len(table) == len(ids)  # every line exactly once
    by_path = {r["audio_filepath"]: r for r in table}
    bad = by_path.pop(str(pipe))
    assert bad["status"] == "error" and bad["text"] is None and bad["id"] == "L00000006", bad
    assert bad["error"].startswith(f"id L00000006 ({pipe}): ") and "within 5 s (shard_timeout_seconds)" in bad["error"]
    assert all(r["status"] == "ok" and r["error"] is None and r["text"] for r in by_path.values()), by_path
    assert "did not finish within 5 s (shard_timeout_seconds)" in err  # the shard, then the item alone
    assert "sending the shard's items one per call" in err and "the item becomes an error row" in err
    isolated = next(r["shard"] for r in table if r["id"] == "L00000006")
    reliability(
        "hung read",
        "a named pipe (no writer) in the manifest, no duration; shard_timeout_seconds: 5",
        ids,
        [r["id"] for r in table],
        f"1 shard (of {max(r['shard'] for r in table) + 1}) retried item by item",
        f"error row naming the file and the limit, {len(by_path)} transcribed "
        f"(shard {isolated} included); exit 0 in {seconds:.0f} s",
    )
    assert seconds < JOB_LIMIT_SECONDS
