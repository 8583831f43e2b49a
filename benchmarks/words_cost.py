"""What words with times and confidence cost: the int8 job with `timestamps: true` against `false`.

    .venv/bin/python benchmarks/words_cost.py [--model demo | quartznet15x5 | FILE.nemo]
        [--hours 0.25] [--runs 3] [--workers 2] [--out benchmarks/results]

The int8 artifact is made once, untimed, and every timed run takes it from the cache: quantization
is the same work with or without words, so leaving it in would only dilute the figure. Each run is
a fresh `asr-runner run` process timed from before it is spawned to its exit; `timestamps: false`
and `true` alternate (off first in even runs, on first in odd runs) so drift hits both.

Statistic, fixed before the runs: per setting, the median of `--runs` process wall clocks (min and
max beside it); the cost is median(on) / median(off) - 1. Also reported, per run: the dispatch
seconds, the worker `words` stage (seconds summed over workers, and its share of the workers'
compute), the driver's Parquet write seconds and the parts' size on disk.
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

from first_run import model_file, summary, write_manifest  # noqa: E402


def one_run(spec: Path, out: Path, cache: Path, workers: int) -> dict:
    cmd = [str(ROOT / ".venv/bin/asr-runner"), "run", str(spec), "--out", str(out), "--workers", str(workers)]
    t0 = time.time()
    proc = subprocess.run(cmd + ["--quiet"], env={**os.environ, "ASR_RUNNER_CACHE": str(cache)}, capture_output=True)
    wall = time.time() - t0
    if proc.returncode != 0:
        raise SystemExit(f"run failed (exit {proc.returncode}):\n{proc.stderr.decode()[-3000:]}")
    stats = json.loads((out / "stats.json").read_text())
    stages = stats["stages"]
    compute = sum(v for k, v in stages.items() if k not in ("write", "ray_overhead", "other"))
    return {
        "wall_seconds": round(wall, 2),
        "total_seconds": stats["total_seconds"],
        "dispatch_seconds": stats["wall_seconds"],
        "words_seconds": stages.get("words", 0.0),
        "words_share_of_compute": round(stages.get("words", 0.0) / compute, 4) if compute else None,
        "write_seconds": stages["write"],
        "parts_mb": round(sum(p.stat().st_size for p in (out / "transcripts").glob("*.parquet")) / 1e6, 3),
        "engine": stats["engine"],
    }


def share_summary(values: list[float]) -> dict:
    return {"median": round(statistics.median(values), 4), "min": min(values), "max": max(values)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="demo")
    parser.add_argument("--hours", type=float, default=0.25)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--out", default=str(ROOT / "benchmarks/results"))
    args = parser.parse_args()

    from runner.sysinfo import cpu_info, int8_flags

    with tempfile.TemporaryDirectory(prefix="words-cost-") as tmp:
        tmp = Path(tmp)
        model = model_file(args.model, tmp)
        manifest = tmp / "manifest.jsonl"
        audio = write_manifest(manifest, args.hours)
        specs = {}
        for on in (False, True):
            specs[on] = tmp / f"job-{on}.yaml"
            specs[on].write_text(
                json.dumps(
                    {
                        "model": str(model),
                        "manifest": str(manifest),
                        "output": str(tmp / "unused"),
                        "precision": "int8",
                        "shard_seconds": 60,
                        "timestamps": on,
                    }
                )
            )
        cache = tmp / "cache"
        one_run(specs[True], tmp / "warm-up", cache, args.workers)  # makes the artifact; untimed
        runs = []
        for r in range(args.runs):
            for on in (False, True) if r % 2 == 0 else (True, False):
                res = one_run(specs[on], tmp / f"run-{r}-{on}", cache, args.workers)
                runs.append({"run": r, "timestamps": on, **res})
                print(
                    f"run {r} timestamps={str(on).lower()}: wall {res['wall_seconds']:.1f} s, dispatch "
                    f"{res['dispatch_seconds']:.2f} s, words stage {res['words_seconds']:.3f} s "
                    f"({100 * (res['words_share_of_compute'] or 0):.1f}% of compute), write "
                    f"{res['write_seconds']:.3f} s, parts {res['parts_mb']} MB",
                    flush=True,
                )
    walls = {on: [r["wall_seconds"] for r in runs if r["timestamps"] is on] for on in (False, True)}
    dispatch = {on: [r["dispatch_seconds"] for r in runs if r["timestamps"] is on] for on in (False, True)}
    med = {on: summary(walls[on])["median"] for on in (False, True)}
    result = {
        "model": args.model,
        "audio_seconds": round(audio, 1),
        "workers": args.workers,
        "cpu": {"model": cpu_info()["model"], "int8_flags": int8_flags(), "cores": os.cpu_count()},
        "statistic": "median of runs, process wall clock, artifact cached; cost = median(on) / median(off) - 1",
        "wall_seconds": {"off": summary(walls[False]), "on": summary(walls[True])},
        "dispatch_seconds": {"off": summary(dispatch[False]), "on": summary(dispatch[True])},
        "cost": round(med[True] / med[False] - 1, 4),
        "words_share_of_compute": share_summary([r["words_share_of_compute"] for r in runs if r["timestamps"]]),
        "runs": runs,
    }
    out = Path(args.out) / f"words_cost_{args.model if args.model in ('demo', 'quartznet15x5') else 'model'}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(
        f"\n{args.model}, {audio / 3600:.2f} h, int8, {args.workers} workers, {result['cpu']['model']} "
        f"({', '.join(result['cpu']['int8_flags']) or 'no AVX-512/VNNI/AMX'}):\n"
        f"  timestamps off: {walls[False]} s -> median {med[False]} s\n"
        f"  timestamps on:  {walls[True]} s -> median {med[True]} s\n"
        f"  cost: {100 * result['cost']:+.1f}% of the job's wall clock; words stage "
        f"{100 * result['words_share_of_compute']['median']:.1f}% of the workers' compute (median)\n"
        f"wrote {out}"
    )


if __name__ == "__main__":
    main()
