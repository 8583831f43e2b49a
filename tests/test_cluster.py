"""Joining an existing Ray cluster with --address: a head node started with `ray start`."""

import json
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from runner.job.run_folder import read_rows

from .support import write_manifest

pytestmark = pytest.mark.slow


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def ray_head(tmp_path):
    """A real head node (`ray start --head --block`), stopped with SIGTERM (drains its own processes)."""
    ray_exe = Path(sys.executable).with_name("ray")
    port = free_port()
    log = open(tmp_path / "ray_head.log", "w")
    proc = subprocess.Popen(
        [str(ray_exe), "start", "--head", f"--port={port}", "--num-cpus=2", "--include-dashboard=false", "--block"],
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    deadline = time.monotonic() + 60
    while "--block" not in (tmp_path / "ray_head.log").read_text():
        assert proc.poll() is None and time.monotonic() < deadline, (tmp_path / "ray_head.log").read_text()
        time.sleep(0.5)
    yield f"127.0.0.1:{port}"
    proc.terminate()
    proc.wait(timeout=60)


def test_job_runs_on_an_existing_cluster(ray_head, speech_files, tiny_nemo_file, tmp_path):
    manifest = write_manifest(tmp_path / "m.jsonl", [{"audio_filepath": p, "text": t} for t, p in speech_files])
    spec = tmp_path / "job.yaml"
    spec.write_text(
        f"model: {tiny_nemo_file}\nmanifest: {manifest}\noutput: {tmp_path / 'out'}\n"
        "precision: fp32\nshard_seconds: 20\n"
    )
    exe = Path(sys.executable).with_name("asr-runner")
    run = subprocess.run(
        [str(exe), "--quiet", "run", str(spec), "--address", ray_head], capture_output=True, text=True, timeout=600
    )
    assert run.returncode == 0, run.stderr[-3000:]
    table = read_rows(tmp_path / "out")
    assert table.num_rows == len(speech_files) and set(table["status"].to_pylist()) == {"ok"}
    stats = json.loads((tmp_path / "out" / "stats.json").read_text())
    assert stats["workers"] == 2 and stats["wer"] < 0.3
