"""`asr-runner compare` on two real runs: the demo's int8 job and its fp32 baseline (made once, ~1 min)."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from runner.cli.compare import compare_runs, write, write_png
from runner.cli.main import main
from runner.metrics import normalize_text, wer

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def demo(tmp_path_factory) -> Path:
    """A demo folder: OUT/int8 and OUT/fp32 (real jobs over the bundled audio), OUT/comparison.*."""
    from runner.cli.demo import run_demo

    out = tmp_path_factory.mktemp("demo")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("ASR_RUNNER_CACHE", str(tmp_path_factory.mktemp("cache")))
        run_demo(out)
    return out


def stats(run: Path) -> dict:
    return json.loads((run / "stats.json").read_text())


def ok_texts(run: Path) -> dict[str, str]:
    rows = pq.read_table(run / "transcripts", columns=["id", "status", "text"]).to_pylist()
    return {r["id"]: r["text"] for r in rows if r["status"] == "ok"}


def test_figures_are_the_runs_stats(demo):
    result = compare_runs(demo / "int8", demo / "fp32")
    a, b = stats(demo / "int8"), stats(demo / "fp32")
    assert result["speedup"] == pytest.approx(a["rtfx"] / b["rtfx"], abs=0.005)
    assert result["wer_difference"] == pytest.approx(a["wer"] - b["wer"], abs=1e-5)
    assert result["cer_difference"] == pytest.approx(a["cer"] - b["cer"], abs=1e-5)
    for run, st in ((result["a"], a), (result["b"], b)):
        for key in (
            "precision",
            "engine",
            "workers",
            "utterances",
            "failed",
            "rtfx",
            "wall_seconds",
            "startup_seconds",
            "wer",
            "cer",
            "total_seconds",
            "rtfx_total",
            "quantize_seconds",
        ):
            assert run[key] == st[key], key
        # the user's clock holds the start-up (quantization included) and the dispatch, and the scoring after
        assert st["total_seconds"] >= st["startup_seconds"] + st["wall_seconds"] >= st["quantize_seconds"]
        assert st["rtfx_total"] == pytest.approx(st["processed_audio_seconds"] / st["total_seconds"], rel=0.01)
        assert st["rtfx_total"] < st["rtfx"]
    assert a["quantize_seconds"] > 0 and b["quantize_seconds"] == 0  # the demo's int8 artifact was made now
    assert result["speedup_total"] == pytest.approx(a["rtfx_total"] / b["rtfx_total"], abs=0.005)
    assert (result["a"]["label"], result["b"]["label"]) == ("int8", "fp32")
    assert json.loads((demo / "comparison.json").read_text()) == result  # the demo shows the same comparison


def test_agreement_is_computed_over_ids_ok_in_both(demo):
    agreement = compare_runs(demo / "int8", demo / "fp32")["agreement"]
    a, b = ok_texts(demo / "int8"), ok_texts(demo / "fp32")
    common = sorted(a.keys() & b.keys())
    texts_a = [normalize_text(a[i] or "") for i in common]
    texts_b = [normalize_text(b[i] or "") for i in common]
    identical = sum(x == y for x, y in zip(texts_a, texts_b)) / len(common)
    assert agreement["utterances"] == len(common) == 125
    assert 0 <= agreement["identical"] <= 1 and agreement["identical"] == pytest.approx(identical, abs=1e-5)
    assert agreement["wer_a_vs_b"] == pytest.approx(wer(texts_b, texts_a), abs=1e-5)
    assert agreement["identical"] > 0.8 and agreement["same_manifest"] and agreement["note"] is None


def test_png_and_json_are_written(demo, tmp_path):
    result = compare_runs(demo / "int8", demo / "fp32")
    figures, chart = write(result, tmp_path / "new" / "folder", "cmp")
    assert json.loads(figures.read_text()) == result
    for png in (chart, demo / "comparison.png"):
        data = png.read_bytes()
        assert data.startswith(PNG_MAGIC) and len(data) > 20_000


def test_fresh_runs_record_each_workers_peak_rss(demo):
    for run in ("int8", "fp32"):
        info = stats(demo / run)["worker_info"]
        assert info and all(100 < w["peak_rss_mb"] < 4000 for w in info.values()), info  # torch alone is ~250 MB
        summary = compare_runs(demo / run, demo / run)["a"]["peak_rss_mb"]
        assert summary["max"] == max(w["peak_rss_mb"] for w in info.values()) and summary["workers"] == len(info)


def test_console_script_prints_the_table_and_writes_both_files(demo, tmp_path):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    run = subprocess.run(
        [sys.executable, "-m", "runner.cli", "compare", str(demo / "int8"), str(demo / "fp32")],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
        timeout=300,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    speedup = compare_runs(demo / "int8", demo / "fp32")["speedup"]
    total = compare_runs(demo / "int8", demo / "fp32")["speedup_total"]
    for text in (
        f"{speedup:.2f}x speedup",
        f"{total:.2f}x end to end",
        "total (command start to _SUCCESS)",
        "WER",
        "identical transcripts",
        "peak worker RSS",
        "int8 vs fp32",
    ):
        assert text in run.stdout, text
    assert (tmp_path / "compare-int8-vs-fp32.png").read_bytes().startswith(PNG_MAGIC)  # default --out: cwd
    assert json.loads((tmp_path / "compare-int8-vs-fp32.json").read_text())["speedup"] == speedup


def test_a_folder_that_is_not_a_finished_run_exits_2_naming_it(demo, tmp_path, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    assert main(["compare", str(empty), str(demo / "fp32")]) == 2
    assert f"{empty}: not a run folder" in capsys.readouterr().err
    unfinished = tmp_path / "unfinished"
    shutil.copytree(demo / "fp32", unfinished)
    (unfinished / "_SUCCESS").unlink()
    assert main(["compare", str(demo / "int8"), str(unfinished), "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert f"{unfinished}: the run has not finished" in err and "--resume" in err
    assert not list(tmp_path.glob("compare-*"))


def test_runs_over_different_manifests_agree_over_common_ids_only(demo, tmp_path):
    other = tmp_path / "other"
    shutil.copytree(demo / "fp32", other)
    job = json.loads((other / "job.json").read_text())
    job["fingerprint"]["manifest_sha256"] = "0" * 64
    (other / "job.json").write_text(json.dumps(job))
    st = stats(other)
    for info in st["worker_info"].values():
        del info["peak_rss_mb"]  # as in runs made before workers reported memory
    (other / "stats.json").write_text(json.dumps(st))
    parts = sorted((other / "transcripts").glob("part-*.parquet"))
    dropped = pq.read_metadata(parts[0]).num_rows
    parts[0].unlink()
    table = pq.read_table(parts[1])  # two ids that name other audio in this "manifest"
    paths = table["audio_filepath"].to_pylist()
    table = table.set_column(1, "audio_filepath", pa.array(["/elsewhere.wav"] * 2 + paths[2:]))
    pq.write_table(table, parts[1])

    result = compare_runs(demo / "int8", other)
    agreement = result["agreement"]
    assert not agreement["same_manifest"] and "different manifests" in agreement["note"]
    assert agreement["other_audio"] == 2 and agreement["utterances"] == 125 - dropped - 2
    assert result["b"]["peak_rss_mb"] is None and result["a"]["peak_rss_mb"]["max"] > 0
    write_png(result, tmp_path / "other.png")
    assert (tmp_path / "other.png").read_bytes().startswith(PNG_MAGIC)
