"""The user's clock: `asr-runner run` as int8 (empty cache: quantization included) and as fp32, same manifest.

    .venv/bin/python benchmarks/first_run.py [--model quartznet15x5 | demo | FILE.nemo]
        [--hours 0.25] [--runs 3] [--workers 2] [--out benchmarks/results]

Each run is a fresh `asr-runner run` process (a new output folder and, for int8, a new empty
int8 cache), timed from before the process is spawned to its exit: what a user waits for,
Python's start-up, Ray's start, the model load and first-time quantization included. fp32 and
int8 alternate (fp32 first in odd runs, int8 first in even runs) so drift hits both.

Statistic, fixed before the runs: the median of `--runs` process wall clocks per precision, with
min and max; the headline ratio is median(fp32) / median(int8) ("int8 finishes N x sooner").
Also printed per run: stats.json's total_seconds, quantize_seconds and dispatch RTFx.

`--model quartznet15x5`: NeMo's QuartzNet15x5 architecture with random weights (BN statistics
randomized), built here once; its transcripts are noise, so only the clock means something.
`--model demo`: the bundled model. The manifest is the bundled test set repeated (new ids) to
`--hours` of audio (the demo's own manifest and calibration set with `--model demo --hours 0`).
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


def build_random_quartznet15x5(path: Path) -> None:
    import torch

    from runner.model.nemo_loader import quiet_nemo_logging
    from runner.training.recipes import build_nemo_model, quartznet15x5_config, randomize_batchnorm

    quiet_nemo_logging()
    torch.manual_seed(0)
    model = build_nemo_model(quartznet15x5_config())
    randomize_batchnorm(model)
    model.save_to(str(path))


def model_file(name: str, tmp: Path) -> Path:
    """`quartznet15x5` (built into `tmp` with random weights), `demo` (the bundled model) or a .nemo path."""
    if name == "quartznet15x5":
        model = tmp / "quartznet15x5.nemo"
        build_random_quartznet15x5(model)
        return model
    return ROOT / "runner/data/demo_quartznet.nemo" if name == "demo" else Path(name).resolve()


def write_manifest(path: Path, hours: float) -> float:
    """The bundled test set repeated (ids r<k>-<id>) until it holds `hours` of audio; returns its seconds."""
    rows = [json.loads(line) for line in open(ROOT / "manifests/demo/test.jsonl")]
    for r in rows:
        r["audio_filepath"] = str(ROOT / "manifests/demo" / r["audio_filepath"])
    seconds, k = 0.0, 0
    with open(path, "w") as f:
        while seconds < hours * 3600:
            for r in rows:
                if seconds >= hours * 3600:
                    break
                f.write(json.dumps({**r, "id": f"r{k}-{Path(r['audio_filepath']).stem}"}) + "\n")
                seconds += r["duration"]
            k += 1
    return seconds


def one_run(spec: Path, out: Path, precision: str, cache: Path, workers: int) -> dict:
    env = {**os.environ, "ASR_RUNNER_CACHE": str(cache)}
    cmd = [
        str(ROOT / ".venv/bin/asr-runner"),
        "run",
        str(spec),
        "--out",
        str(out),
        "--precision",
        precision,
        "--workers",
        str(workers),
        "--quiet",
    ]
    t0 = time.time()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    wall = time.time() - t0
    if proc.returncode != 0:
        raise SystemExit(
            f"{precision} run failed (exit {proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
        )
    stats = json.loads((out / "stats.json").read_text())
    q = stats.get("quantization") or {}
    return {
        "precision": precision,
        "wall_seconds": round(wall, 2),
        "total_seconds": stats.get("total_seconds"),
        "quantize_seconds": stats.get("quantize_seconds"),
        "rtfx_dispatch": stats.get("rtfx"),
        "rtfx_total": stats.get("rtfx_total"),
        "startup_seconds": stats.get("startup_seconds"),
        "audio_seconds": stats.get("audio_seconds"),
        "wer": stats.get("wer"),
        "fp32_units": q.get("fp32_units"),
        "engine": stats.get("engine"),
    }


def summary(values: list[float]) -> dict:
    return {"median": round(statistics.median(values), 2), "min": round(min(values), 2), "max": round(max(values), 2)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="quartznet15x5")
    parser.add_argument("--hours", type=float, default=0.25)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument(
        "--cached",
        action="store_true",
        help="int8 runs find the artifact in the cache (made once before the timed runs): what "
        "every run after the first costs",
    )
    parser.add_argument("--out", default=str(ROOT / "benchmarks/results"))
    args = parser.parse_args()

    from runner.sysinfo import cpu_info, int8_flags

    with tempfile.TemporaryDirectory(prefix="first-run-") as tmp:
        tmp = Path(tmp)
        model = model_file(args.model, tmp)
        if args.hours > 0:
            manifest = tmp / "manifest.jsonl"
            audio = write_manifest(manifest, args.hours)
            calibration = None
        else:  # the demo job's own manifests
            manifest = ROOT / "manifests/demo/test.jsonl"
            calibration = ROOT / "manifests/demo/calibration.jsonl"
            audio = sum(json.loads(line)["duration"] for line in open(manifest))
        spec = tmp / "job.yaml"
        quant = {"calibration_manifest": str(calibration)} if calibration else {}
        spec.write_text(
            json.dumps(
                {
                    "model": str(model),
                    "manifest": str(manifest),
                    "output": str(tmp / "unused"),
                    "precision": "int8",
                    "threads_per_worker": 1,
                    "shard_seconds": 60,
                    "quantization": quant,
                }
            )
        )
        runs = []
        if args.cached:  # one untimed int8 run fills the cache every timed int8 run then uses
            one_run(spec, tmp / "warm-up", "int8", tmp / "cache-warm", args.workers)
        for r in range(args.runs):
            order = ("fp32", "int8") if r % 2 == 0 else ("int8", "fp32")
            for precision in order:
                cache = tmp / "cache-warm" if args.cached else tmp / f"cache-{precision}-{r}"
                res = one_run(spec, tmp / f"{precision}-{r}", precision, cache, args.workers)
                runs.append({"run": r, **res})
                print(
                    f"run {r} {precision}: wall {res['wall_seconds']:.1f} s (stats total {res['total_seconds']} s, "
                    f"quantize {res['quantize_seconds']} s, dispatch RTFx {res['rtfx_dispatch']}, "
                    f"fp32 units {res['fp32_units']})",
                    flush=True,
                )
    walls = {p: [r["wall_seconds"] for r in runs if r["precision"] == p] for p in ("fp32", "int8")}
    quantize = [r["quantize_seconds"] for r in runs if r["precision"] == "int8"]
    result = {
        "model": args.model,
        "audio_seconds": round(audio, 1),
        "workers": args.workers,
        "cpu": {"model": cpu_info()["model"], "int8_flags": int8_flags(), "cores": os.cpu_count()},
        "statistic": "median of runs, process wall clock, "
        + ("int8 artifact cached" if args.cached else "empty int8 cache each int8 run"),
        "cached": args.cached,
        "fp32": summary(walls["fp32"]),
        "int8": summary(walls["int8"]),
        "quantize_seconds": summary(quantize),
        "int8_sooner": round(statistics.median(walls["fp32"]) / statistics.median(walls["int8"]), 2),
        "runs": runs,
    }
    print(
        f"{args.model}, {audio / 3600:.2f} h of audio, {args.workers} workers x 1 thread, "
        f"CPU {result['cpu']['model']} "
        f"(int8 flags: {', '.join(result['cpu']['int8_flags']) or 'none'})"
    )
    for p in ("fp32", "int8"):
        s = result[p]
        print(f"  {p} job, whole command: median {s['median']:.1f} s (min {s['min']:.1f}, max {s['max']:.1f})")
    q = result["quantize_seconds"]
    print(
        f"  of which {'quantization (cached)' if args.cached else 'first-time quantization'}: "
        f"median {q['median']:.1f} s (min {q['min']:.1f}, max {q['max']:.1f})"
    )
    print(f"  int8 finishes {result['int8_sooner']:.2f}x sooner (median / median)")
    Path(args.out).mkdir(parents=True, exist_ok=True)
    name = args.model if args.model in ("demo", "quartznet15x5") else Path(args.model).stem
    from runner.sysinfo import cpu_tag

    hours = "" if args.hours in (0, 0.25) else f"_{args.hours:g}h"  # the 0.25 h keeps the plain name
    path = Path(args.out) / f"first_run_{name}{hours}{'_cached' if args.cached else ''}-{cpu_tag()}.json"
    path.write_text(json.dumps(result, indent=2))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
