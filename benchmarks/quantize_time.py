"""First-time quantization from the user's chair, and the decisions it takes, per model.

    .venv/bin/python benchmarks/quantize_time.py [--models demo,quartznet15x5,citrinet256,fastconformer]
        [--runs 3] [--out benchmarks/results]

Each run is a fresh Python process that does what a job's driver does the first time (empty cache):
load the .nemo, draw and read the samples, calibrate, gate, self-check, serialize
(`runner.int8.pipeline.make_artifact`, `use_cache=False`); timed from before the process is spawned to
its exit, imports included. Statistic, fixed before the runs: median of `--runs` runs with min and
max, with the default settings (the gate stops early once its decision is clear). One more run per
model reads the whole gate (`early_stop=False`, the gate as it was): the decisions (observer, engine,
units kept in fp32, pass or fail) are printed side by side.

Models: the bundled demo QuartzNet on the demo job's own manifests (test set, separate calibration
set); NeMo's QuartzNet15x5, Citrinet-256 (SentencePiece tokenizer trained here) and FastConformer-CTC
large with random weights (BN statistics randomized), on 0.25 h of the bundled espeak-ng speech (the
test set repeated, new ids) with calibration and gate drawn from it, as a job without a calibration
manifest does. Random weights make transcripts noise: the gate compares int8 with fp32 transcripts.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

RUN = r"""
import json, sys
from runner.int8.pipeline import GateFailed
from runner.int8.config import Settings
from runner.int8.make import make_artifact
from runner.int8.artifact import Artifact
model, manifest, calibration, early = sys.argv[1], sys.argv[2], sys.argv[3] or None, sys.argv[4] == "1"
try:
    data = make_artifact(model, manifest, calibration, Settings(early_stop=early), use_cache=False).data
    report = Artifact.from_bytes(data).report
except GateFailed as exc:
    report = exc.report
g = report["gate"]
print("RESULT " + json.dumps({"seconds": report.get("seconds"), "phases": report.get("phase_seconds"),
      "observer": report.get("observer"), "engine": report.get("engine"), "fp32_units": report.get("fp32_units"),
      "passed": g.get("passed"), "increase": g.get("increase"), "chunks_read": g.get("chunks_read"),
      "chunks": g.get("chunks"), "gate_utterances": g.get("utterances"), "leaders": g.get("leaders")}))
"""


def build(name: str, folder: Path) -> Path:
    import torch

    from runner.model.nemo_loader import quiet_nemo_logging
    from runner.training.recipes import (
        build_nemo_model,
        citrinet_256_config,
        fastconformer_ctc_config,
        quartznet15x5_config,
        randomize_batchnorm,
        train_tokenizer,
    )

    if name == "demo":
        return ROOT / "runner/data/demo_quartznet.nemo"
    path = folder / f"{name}.nemo"
    if path.exists():
        return path
    quiet_nemo_logging()
    torch.manual_seed(0)
    if name == "quartznet15x5":
        model = build_nemo_model(quartznet15x5_config())
    elif name == "citrinet256":
        from runner.training.corpus import sentences

        tokenizer = train_tokenizer(sentences(2000, seed=1), folder / "tokenizer", vocab_size=256)
        model = build_nemo_model(citrinet_256_config(tokenizer))
    elif name == "fastconformer":
        model = build_nemo_model(fastconformer_ctc_config("large"))
    else:
        raise SystemExit(f"unknown model {name}")
    randomize_batchnorm(model)
    model.save_to(str(path))
    return path


def model_inputs(names: list[str], models_dir: str | None, tmp: str):
    """(name, .nemo file, manifest, calibration manifest or "") per model: the demo model with its own test
    and calibration manifests; the others (built into `models_dir`, else `tmp`) with 0.25 h of the bundled
    speech, calibration drawn from it."""
    from first_run import write_manifest

    folder = Path(models_dir or tmp)
    folder.mkdir(parents=True, exist_ok=True)
    job_manifest = Path(tmp) / "manifest.jsonl"
    write_manifest(job_manifest, 0.25)
    for name in names:
        model = build(name, folder)
        if name == "demo":
            yield name, model, ROOT / "manifests/demo/test.jsonl", str(ROOT / "manifests/demo/calibration.jsonl")
        else:
            yield name, model, job_manifest, ""


def one(model: Path, manifest: Path, calibration: str, early: bool) -> dict:
    t0 = time.time()
    proc = subprocess.run(
        [sys.executable, "-c", RUN, str(model), str(manifest), calibration, "1" if early else "0"],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    wall = time.time() - t0
    line = next((x for x in proc.stdout.splitlines() if x.startswith("RESULT ")), None)
    if proc.returncode != 0 or line is None:
        raise SystemExit(f"{model}: run failed (exit {proc.returncode}):\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}")
    return {"wall_seconds": round(wall, 2), **json.loads(line[len("RESULT ") :])}


def decisions(r: dict) -> dict:
    return {k: r[k] for k in ("observer", "engine", "fp32_units", "passed")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="demo,quartznet15x5,citrinet256,fastconformer")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--models-dir", default=None, help="keep the built .nemo files here (default: a temp folder)")
    parser.add_argument("--out", default=str(ROOT / "benchmarks/results"))
    args = parser.parse_args()

    from runner.sysinfo import cpu_info, cpu_tag, int8_flags

    cpu = {"model": cpu_info()["model"], "int8_flags": int8_flags(), "cores": os.cpu_count()}
    results = {}
    with tempfile.TemporaryDirectory(prefix="quantize-time-") as tmp:
        for name, model, manifest, calibration in model_inputs(args.models.split(","), args.models_dir, tmp):
            runs = []
            for r in range(args.runs):
                runs.append(one(model, manifest, calibration, True))
                print(
                    f"{name} run {r}: {runs[-1]['wall_seconds']:.1f} s (quantize_model {runs[-1]['seconds']} s, "
                    f"phases {runs[-1]['phases']}, gate chunks {runs[-1]['chunks_read']}/{runs[-1]['chunks']})",
                    flush=True,
                )
            whole = one(model, manifest, calibration, False)
            print(f"{name} whole gate: {whole['wall_seconds']:.1f} s, {decisions(whole)}", flush=True)
            walls = [r["wall_seconds"] for r in runs]
            same = all(decisions(r) == decisions(whole) for r in runs)
            results[name] = {
                "median": round(statistics.median(walls), 2),
                "min": min(walls),
                "max": max(walls),
                "decisions": decisions(runs[0]),
                "whole_gate_decisions": decisions(whole),
                "same_decisions": same,
                "runs": runs,
                "whole_gate": whole,
            }
            print(
                f"{name}: first-time quantization median {results[name]['median']:.1f} s (min {min(walls):.1f}, "
                f"max {max(walls):.1f}); decisions {decisions(runs[0])}; same as the whole gate's: {same}",
                flush=True,
            )
    print(f"CPU {cpu['model']} ({cpu['cores']} cores; int8 flags: {', '.join(cpu['int8_flags']) or 'none'})")
    Path(args.out).mkdir(parents=True, exist_ok=True)
    path = Path(args.out) / f"quantize_time_{args.models.replace(',', '_')}-{cpu_tag()}.json"
    path.write_text(
        json.dumps({"cpu": cpu, "statistic": "median of runs, process wall clock", "models": results}, indent=2)
    )
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
