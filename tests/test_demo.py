"""`asr-runner demo` end to end, from the installed console script: bundled model, bundled audio, offline."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]


def test_demo_runs_int8_and_fp32_and_compares(tmp_path):
    script = Path(sys.executable).parent / "asr-runner"
    env = {**os.environ, "ASR_RUNNER_CACHE": str(tmp_path / "cache")}
    out = tmp_path / "demo"
    run = subprocess.run(
        [str(script), "demo", "--out", str(out), "--quiet"], capture_output=True, text=True, env=env, timeout=600
    )
    assert run.returncode == 0, run.stderr[-3000:]
    assert "speedup" in run.stdout and "WER" in run.stdout and "identical transcripts" in run.stdout
    assert "x end to end" in run.stdout and "total (command start to _SUCCESS)" in run.stdout
    assert "Warning" not in run.stderr and "deprecat" not in run.stderr.lower()
    result = json.loads((out / "comparison.json").read_text())
    for precision in ("int8", "fp32"):
        assert (out / precision / "_SUCCESS").exists()
        stats = json.loads((out / precision / "stats.json").read_text())
        assert stats["utterances"] == 125 and stats["failed"] == 0 and stats["worker_heavy_imports"] == []
    int8, fp32 = result["a"], result["b"]  # `asr-runner compare OUT/int8 OUT/fp32`
    assert (int8["precision"], fp32["precision"]) == ("int8", "fp32")
    assert fp32["wer"] <= 0.15 and fp32["cer"] <= 0.06  # issue 5's accuracy targets
    assert int8["wer"] <= fp32["wer"] + 0.005
    # The speedup is a figure, not a test: the whole dispatch is ~1-2 s here, so scheduling noise decides
    # it (2.19x on one run, 0.92x on another). benchmarks/first_run.py measures it (median of alternated runs).
    assert int8["engine"] != "fp32" and result["speedup"] > 0 and result["speedup_total"] > 0
    assert (out / "comparison.png").read_bytes().startswith(b"\x89PNG")
    assert json.loads((out / "int8" / "quantization.json").read_text())["gate"]["passed"]
