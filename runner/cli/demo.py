"""`asr-runner demo`: the bundled model and audio, as an int8 job and its fp32 baseline, compared.

Offline: the model (`runner/data/demo_quartznet.nemo`, trained here on espeak-ng speech by
`runner/training/demo_recipe.py`) and the audio (`manifests/demo/`) ship with the project. The job is
`jobs/demo.yaml`; the int8 artifact is made once and cached like any other. The comparison is
`asr-runner compare OUT/int8 OUT/fp32`'s, written as OUT/comparison.json and OUT/comparison.png.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

from runner.cli import compare
from runner.errors import InputError
from runner.job.events import EventHandler
from runner.job.run import run_job
from runner.job.spec import load_spec

ROOT = Path(__file__).resolve().parents[2]
DEMO_JOB = ROOT / "jobs" / "demo.yaml"


def run_demo(out: Path | None = None, progress: Callable[[], EventHandler] | None = None) -> dict:
    """Run int8 then fp32 over the demo manifest into OUT/int8 and OUT/fp32; return their comparison.

    `progress()` makes a fresh event handler for each of the two jobs (closed after it, if it can be)."""
    if not DEMO_JOB.is_file() or not (ROOT / "manifests" / "demo" / "test.jsonl").is_file():
        raise InputError(
            f"the demo needs {DEMO_JOB} and {ROOT / 'manifests/demo'} from the project checkout; "
            "run it from a clone of the repository (pip install -e .)"
        )
    out = Path(out or ROOT / "runs" / time.strftime("demo-%Y%m%d-%H%M%S")).resolve()
    for precision in ("int8", "fp32"):
        spec = load_spec(DEMO_JOB, output=str(out / precision), precision=precision)
        on_event = progress() if progress else (lambda kind, **data: None)
        try:
            run_job(spec, on_event=on_event)
        finally:
            getattr(on_event, "close", lambda: None)()
    comparison = compare.compare_runs(out / "int8", out / "fp32")
    compare.write(comparison, out, "comparison")
    return comparison
