"""Issue 6: faults injected into real jobs (local Ray, real Parquet, espeak-ng speech).

Every manifest line lands exactly once (transcribed or an error row with its reason), or the
job stops before any work with exit 2 naming the bad input. Each fault test records its
measured outcome; the table is printed at the end of the pytest run (README "Reliability").
"""

from __future__ import annotations

import json
import re
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import soundfile as sf

from runner.cli.main import main
from runner.inputs.manifest import iter_manifest
from runner.job.run import run_job
from runner.job.run_folder import read_rows, write_part
from runner.job.spec import DEMO_MODEL, load_spec
from runner.metrics import cer, normalize_text

from .badaudio import make_bad_audio
from .support import demo_rows, manifest_ids, running_driver, stamps, write_manifest, write_spec

pytestmark = pytest.mark.slow


# --- bad audio -----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def bad_audio(tmp_path_factory, speech, long_speech):
    """The matrix of tests/badaudio.py; its long file is the >= 10-minute fixture played twice."""
    folder = tmp_path_factory.mktemp("bad audio")
    path, reference = long_speech
    audio, _ = sf.read(path, dtype="float32")
    rows = make_bad_audio(folder, speech[0], (f"{reference} {reference}", np.concatenate([audio, audio])))
    manifest = write_manifest(
        folder / "manifest.jsonl",
        [{k: v for k, v in r.items() if k not in ("case", "expect") and v is not None} for r in rows],
    )
    return folder, manifest, rows


def test_every_bad_file_is_transcribed_or_an_error_row_naming_it(
    ray_local, bad_audio, speech, tiny_nemo_file, tmp_path, reliability
):
    folder, manifest, cases = bad_audio
    out = tmp_path / "out"
    spec = write_spec(
        tmp_path / "job.yaml",
        model=tiny_nemo_file,
        manifest=manifest,
        output=out,
        shard_seconds=30,
        max_failed=len(cases),
    )
    assert main(["--quiet", "run", str(spec)]) == 0
    table = read_rows(out).to_pylist()
    by_id = {r["id"]: r for r in table}
    items = list(iter_manifest(manifest))
    assert sorted(by_id) == sorted(i.id for i in items) and len(table) == len(items)
    long_minutes = 0.0
    for item, case in zip(items, cases):
        row, what = by_id[item.id], f"{case['case']}: {by_id[item.id]}"
        if case["expect"] == "error":
            assert row["status"] == "error" and row["text"] is None, what
            assert row["error"].startswith(f"id {item.id} ({item.audio_filepath}): "), what
            assert "Traceback" not in row["error"], what
            continue
        assert row["status"] == "ok" and row["error"] is None, what
        heard = cer([normalize_text(case["text"] or "")], [normalize_text(row["text"])])
        if case["expect"] == "ok":  # speech in another container, rate, width or path: still heard
            assert heard <= 0.25, what
        elif case["expect"] == "narrowband":  # resampled 8 kHz -> 16 kHz: all there, the top band missing
            assert heard <= 0.5 and abs(row["duration"] - len(speech[0][1]) / 16000) < 0.01, what
        elif case["expect"] == "empty":  # digital silence: no words (the model would babble on it)
            assert row["text"] == "", what
        elif case["expect"] == "any":  # 0.05 s: a syllable at most
            assert isinstance(row["text"], str) and len(row["text"]) <= 5, what
        elif case["expect"] == "partial":  # `duration` shorter than the file: that segment only
            assert abs(row["duration"] - case["duration"]) < 0.01 and row["text"], what
        elif case["expect"] == "long":
            long_minutes = row["duration"] / 60
            # The tiny model learnt on short utterances (tests/test_long_audio.py: CER < 0.5 on such files):
            # what matters here is that all 20 minutes were heard, in windows, without a crash.
            words = len(row["text"].split()) / len(case["text"].split())
            assert long_minutes >= 20 and heard < 0.5 and 0.7 < words < 1.3, (heard, words, what[:300])
        if "duration" in case and case["expect"] == "ok":  # a manifest duration past the end: the real length
            assert row["duration"] < case["duration"], what
    stats = json.loads((out / "stats.json").read_text())
    errors = sum(c["expect"] == "error" for c in cases)
    assert stats["failed"] == errors and stats["utterances"] == len(items)
    reliability(
        "bad audio",
        f"{len(cases)} generated files ({errors} unreadable, a {long_minutes:.0f}-min one, "
        "8/48 kHz, 24-bit, float, OGG, MP3, NaN, non-ASCII path)",
        [i.id for i in items],
        by_id,
        "-",
        f"{errors} error rows naming id and file, {len(items) - errors} transcribed; exit 0",
    )


# --- damaged output ------------------------------------------------------------------------------


def flip_in_column(path: Path, column: str) -> None:
    """Flip one byte in the middle of a column chunk's pages (its data, not the footer)."""
    meta = pq.ParquetFile(path).metadata.row_group(0)
    chunk = next(meta.column(c) for c in range(meta.num_columns) if meta.column(c).path_in_schema == column)
    start = chunk.dictionary_page_offset or chunk.data_page_offset
    data = bytearray(path.read_bytes())
    data[start + chunk.total_compressed_size // 2] ^= 0x5A
    path.write_bytes(bytes(data))


def test_damaged_parts_are_found_at_resume_and_only_they_recomputed(
    ray_local, speech_files, tiny_nemo_file, tmp_path, reliability
):
    rows = [{"audio_filepath": path, "text": text} for text, path in speech_files]
    manifest = write_manifest(tmp_path / "manifest.jsonl", rows, newline="\r\n", bom=True)  # BOM + CRLF: read fine
    out = tmp_path / "out"
    spec = write_spec(tmp_path / "job.yaml", model=tiny_nemo_file, manifest=manifest, output=out, shard_seconds=8)
    run_job(load_spec(spec))
    parts = sorted((out / "transcripts").glob("part-*.parquet"))
    assert len(parts) >= 9
    first = read_rows(out).sort_by("id")

    parts[1].write_bytes(parts[1].read_bytes()[: parts[1].stat().st_size // 2])  # cut short
    flip_in_column(parts[3], "text")  # one bit rotten on disk
    parts[5].write_bytes(parts[6].read_bytes())  # another shard's part
    parts[7].unlink()  # lost
    write_part(out, 2, pq.read_table(parts[2]).to_pylist()[:-1])  # a valid file, a row short
    stale = out / "transcripts" / ".part-00004.parquet.x1y2.tmp"  # an interrupted write
    stale.write_bytes(b"half a part")
    theirs = [out / "notes.txt", out / "transcripts" / "README.md", out / "transcripts" / "part-00999.parquet"]
    for path in theirs:  # files the runner did not create: kept, never read
        path.write_bytes(parts[0].read_bytes() if path.suffix == ".parquet" else b"mine")
    before = stamps(out)

    run_job(load_spec(spec), resume=True)
    after = stamps(out)
    rewritten = sorted(int(name[5:10]) for name in after if before.get(name) != after[name])
    assert rewritten == [1, 2, 3, 5, 7]
    again = read_rows(out).sort_by("id")
    assert again.select(["id", "text", "status"]).equals(first.select(["id", "text", "status"]))
    assert not stale.exists() and all(p.read_bytes() for p in theirs)
    assert json.loads((out / "stats.json").read_text())["utterances"] == len(rows)
    reliability(
        "damaged output",
        "part cut in half; 1 byte flipped in a data page; part of another shard; "
        "part deleted; part a row short; stale temp file; foreign files beside the parts",
        manifest_ids(manifest),
        again["id"].to_pylist(),
        f"{len(rewritten)} of {len(parts)} (exactly the damaged ones)",
        "detected at --resume (page CRC, row digest, row count, shard); temp file removed, "
        "foreign files kept and not read",
    )


# --- driver killed -------------------------------------------------------------------------------


def test_killed_driver_is_resumed_without_rewriting_finished_parts(ray_local, tmp_path, reliability):
    manifest = write_manifest(tmp_path / "manifest.jsonl", demo_rows(4))  # 500 utterances, 18 minutes
    out = tmp_path / "out"
    spec = write_spec(tmp_path / "job.yaml", model=DEMO_MODEL, manifest=manifest, output=out, shard_seconds=30)
    with running_driver(spec, lambda: len(stamps(out) if out.exists() else {}) >= 3, "the driver"):
        pass  # SIGKILLed on the way out
    at_kill = stamps(out)
    shards = len(json.loads((out / "job.json").read_text())["plan"])
    assert 3 <= len(at_kill) < shards and not (out / "_SUCCESS").exists()

    assert main(["--quiet", "run", str(spec), "--resume"]) == 0
    after = stamps(out)
    assert all(after[name] == stamp for name, stamp in at_kill.items())  # finished parts not rewritten
    assert len(after) == shards and (out / "_SUCCESS").exists()
    ids = manifest_ids(manifest)
    table_ids = read_rows(out, ["id"])["id"].to_pylist()
    assert sorted(table_ids) == sorted(ids)
    reliability(
        "driver killed",
        f"SIGKILL of the `asr-runner run` process after {len(at_kill)} of {shards} parts, then `--resume`",
        ids,
        table_ids,
        f"{shards - len(at_kill)} (the unfinished ones)",
        "finished parts untouched (same inode and mtime); job completed, exit 0",
    )


# --- bad manifests and specs ---------------------------------------------------------------------

GOOD = {"audio_filepath": "a.wav", "duration": 1.0, "text": "hello"}


@pytest.mark.parametrize(
    "lines,spec_extra,message",
    [
        (['{"audio_filepath": "a.wav"', None], {}, r"manifest.jsonl:1: invalid JSON"),
        ([GOOD, {"duration": 2.0}], {}, r"manifest.jsonl:2: missing `audio_filepath`"),
        ([GOOD, {**GOOD, "duration": "long"}], {}, r"manifest.jsonl:2: `duration` must be a non-negative number"),
        ([GOOD, GOOD, {**GOOD, "offset": -1}], {}, r"manifest.jsonl:3: `offset` must be a non-negative number"),
        ([GOOD, {**GOOD, "text": 12}], {}, r"manifest.jsonl:2: `text` must be a string"),
        (
            [{**GOOD, "id": "x"}, GOOD, {**GOOD, "id": "x"}],
            {},
            r"manifest.jsonl:3: duplicate id 'x' \(first on line 1\)",
        ),
        (["[1, 2]"], {}, r"manifest.jsonl:1: expected a JSON object"),
        ([b"\xff\xfe\x00 not utf-8"], {}, r"manifest.jsonl: not UTF-8"),
        ([], {}, r"manifest.jsonl: the manifest has no items"),
        ([GOOD], {"wokers": 2}, r"unknown key.*wokers"),
        ([GOOD], {"workers": "two"}, r"workers"),
        ([GOOD], {"precision": "int4"}, r"precision"),
    ],
    ids=[
        "invalid-json",
        "no-audio_filepath",
        "duration-type",
        "negative-offset",
        "text-type",
        "duplicate-id",
        "not-an-object",
        "not-utf8",
        "empty",
        "unknown-spec-key",
        "spec-type",
        "spec-value",
    ],
)
def test_bad_manifest_or_spec_exits_2_before_any_work(tmp_path, capsys, tiny_nemo_file, lines, spec_extra, message):
    raw = b"".join(
        line if isinstance(line, bytes) else ((line if isinstance(line, str) else json.dumps(line)) + "\n").encode()
        for line in lines
        if line
    )
    (tmp_path / "manifest.jsonl").write_bytes(raw)
    out = tmp_path / "out"
    spec = write_spec(
        tmp_path / "job.yaml", model=tiny_nemo_file, manifest=tmp_path / "manifest.jsonl", output=out, **spec_extra
    )
    t0 = time.monotonic()
    assert main(["--quiet", "run", str(spec)]) == 2
    err = capsys.readouterr().err
    assert re.search(message, err), err
    assert not out.exists() and time.monotonic() - t0 < 20  # no output folder; no Ray started, no model loaded


# --- output safety -------------------------------------------------------------------------------


def tree(folder: Path) -> dict[str, tuple[int, int]]:
    return {str(p.relative_to(folder)): (p.stat().st_size, p.stat().st_mtime_ns) for p in folder.rglob("*")}


def test_a_run_writes_only_inside_its_output_and_refuses_another_job(
    ray_local, speech_files, tiny_nemo_file, tmp_path, monkeypatch, capsys
):
    monkeypatch.chdir(tmp_path)  # the working directory is watched too
    audio_dir = Path(speech_files[0][1]).parent
    rows = [{"audio_filepath": path, "text": text} for text, path in speech_files[:12]]
    manifest = write_manifest(tmp_path / "manifest.jsonl", rows)
    out = tmp_path / "runs" / "a"
    spec = write_spec(tmp_path / "a.yaml", model=tiny_nemo_file, manifest=manifest, output=out, shard_seconds=10)
    watched = {"tmp": tmp_path, "audio": audio_dir, "model": Path(tiny_nemo_file).parent}
    before = {k: tree(v) for k, v in watched.items()}
    assert main(["--quiet", "run", str(spec)]) == 0
    after = {k: tree(v) for k, v in watched.items()}
    new = sorted(set(after["tmp"]) - set(before["tmp"]))
    assert all(p == "runs" or p.startswith("runs/a") for p in new), new
    assert {k: v for k, v in after["tmp"].items() if k in before["tmp"]} == before["tmp"]
    assert after["audio"] == before["audio"] and after["model"] == before["model"]

    # Another job (different shard plan) into the same folder: refused, with or without --resume.
    other = write_spec(tmp_path / "b.yaml", model=tiny_nemo_file, manifest=manifest, output=out, shard_seconds=5)
    snapshot = tree(out)
    assert main(["--quiet", "run", str(other)]) == 2
    assert "already holds a job" in capsys.readouterr().err
    assert main(["--quiet", "run", str(other), "--resume"]) == 2
    assert "shard_seconds changed" in capsys.readouterr().err
    # A file where the output folder should be, and a damaged job.json: refused, untouched.
    (tmp_path / "a-file").write_text("mine")
    assert main(["--quiet", "run", str(spec), "--out", str(tmp_path / "a-file")]) == 2
    assert "is a file, not a directory" in capsys.readouterr().err
    assert tree(out) == snapshot and (tmp_path / "a-file").read_text() == "mine"
    (out / "job.json").write_text("{not json")
    assert main(["--quiet", "run", str(spec), "--resume"]) == 2
    assert "job.json is unreadable" in capsys.readouterr().err


def test_a_worker_that_cannot_build_its_model_stops_the_job_with_the_reason(ray_local, tmp_path):
    from runner.job.ray_pool import WorkersLost
    from runner.job.shard_pool import ShardPool
    from runner.job.worker import Int8Payload

    manifest = write_manifest(tmp_path / "manifest.jsonl", demo_rows(1)[:4])
    spec = load_spec(write_spec(tmp_path / "job.yaml", model=DEMO_MODEL, manifest=manifest, output=tmp_path / "out"))
    t0 = time.monotonic()
    with pytest.raises(WorkersLost, match=r"a worker failed to start \(.+\); nothing was transcribed"):
        with ShardPool(spec, Int8Payload(b"not an artifact", "auto")):
            pass
    assert time.monotonic() - t0 < 60  # no waiting for replacements that would fail the same way
