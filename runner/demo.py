"""`asr-runner demo`: the bundled model and audio, as an int8 job and its fp32 baseline, compared.

Offline: the model (`runner/data/demo_quartznet.nemo`, trained here on espeak-ng speech by
`runner/demo_recipe.py`) and the audio (`manifests/demo/`) ship with the project. The job is
`jobs/demo.yaml`; the int8 artifact is made once and cached like any other.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Callable, Optional

from .errors import InputError
from .jobs import Event, run_job
from .output import write_json
from .spec import load_spec

ROOT = Path(__file__).resolve().parents[1]
DEMO_JOB = ROOT / "jobs" / "demo.yaml"


def run_demo(out: Optional[Path] = None, progress: Optional[Callable[[], Event]] = None) -> dict:
    """Run int8 then fp32 over the demo manifest into OUT/int8 and OUT/fp32; return the comparison.

    `progress()` makes a fresh event handler for each of the two jobs (closed after it, if it can be)."""
    if not DEMO_JOB.is_file() or not (ROOT / "manifests" / "demo" / "test.jsonl").is_file():
        raise InputError(f"the demo needs {DEMO_JOB} and {ROOT / 'manifests/demo'} from the project checkout; "
                         "run it from a clone of the repository (pip install -e .)")
    out = Path(out or ROOT / "runs" / time.strftime("demo-%Y%m%d-%H%M%S")).resolve()
    stats = {}
    for precision in ("int8", "fp32"):
        spec = load_spec(DEMO_JOB, output=str(out / precision), precision=precision)
        on_event = progress() if progress else (lambda kind, **data: None)
        try:
            stats[precision] = run_job(spec, on_event=on_event).stats
        finally:
            getattr(on_event, "close", lambda: None)()
    comparison = compare(stats["int8"], stats["fp32"])
    comparison["runs"] = {"int8": str(out / "int8"), "fp32": str(out / "fp32")}
    write_json(out / "comparison.json", comparison)
    return comparison


def compare(int8: dict, fp32: dict) -> dict:
    """The figures a user compares: accuracy of each and the difference, speed of each and the ratio."""
    def diff(key):
        return None if int8[key] is None or fp32[key] is None else round(int8[key] - fp32[key], 5)

    return {
        "utterances": int8["utterances"], "audio_seconds": int8["audio_seconds"],
        "int8": {k: int8[k] for k in ("wer", "cer", "rtfx", "wall_seconds", "startup_seconds", "engine", "workers")},
        "fp32": {k: fp32[k] for k in ("wer", "cer", "rtfx", "wall_seconds", "startup_seconds", "engine", "workers")},
        "wer_difference": diff("wer"), "cer_difference": diff("cer"),
        "speedup": round(int8["rtfx"] / fp32["rtfx"], 2) if int8["rtfx"] and fp32["rtfx"] else None,
        "quantization": {k: v for k, v in (int8.get("quantization") or {}).items() if k != "gate"},
        "cpu": int8["cpu"],
    }
