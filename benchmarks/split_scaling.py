"""One long recording on 1, 2, ... N workers: what splitting it at pauses buys (issue 20).

    .venv/bin/python benchmarks/split_scaling.py [--minutes 16] [--workers 1,2] [--runs 3]
        [--model demo | quartznet15x5 | FILE.nemo] [--precision int8] [--segment-seconds 120]
        [--files 1] [--clips 3] [--out benchmarks/results]

The manifest: `--files` espeak-ng recordings of `--minutes` each (demo-grammar sentences with 0.25-1.2 s
pauses, `runner.training.long_recording`) and `--clips` short clips of the demo test set. For each worker
count, rounds alternate the order, and each run is a fresh `asr-runner run` process (new output folder;
for int8 the artifact made once before the timed runs, so every run finds it cached). Also timed, once per
round: the same job with `split_seconds: 0` on the largest worker count, where each long file goes to one
worker whole, as before this release.

Statistic, fixed before the runs: the median of `--runs` runs per configuration, with min and max, of
(a) the process wall clock (what the user waits for: start-up included) and (b) stats.json's dispatch
seconds (first shard sent to last part written: where splitting acts). Speed-up of n workers =
median(1 worker) / median(n workers); efficiency = speed-up / n.

Accuracy, from the last round: WER of each long file's split transcript against its whole-file
(unsplit) transcript, and the same word times; the cuts (pause or forced) as the parts record them.

Sixteen-core scaling (the issue's 2-hour recording on 1, 4, 8, 16 workers):
    .venv/bin/python benchmarks/split_scaling.py --minutes 120 --workers 1,4,8,16 --runs 3
Run it where there are that many cores; on fewer, Ray queues the surplus workers and the figures say so.
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

from benchmarks.first_run import model_file  # noqa: E402


def write_manifest(folder: Path, minutes: float, files: int, clips: int) -> tuple[Path, float]:
    from runner.training.long_recording import long_recording

    rows = []
    for k in range(files):
        path, reference = long_recording(folder / f"talk{k}.flac", minutes * 60, seed=100 + k)
        rows.append({"id": f"talk{k}", "audio_filepath": path, "text": reference})
    demo = [json.loads(line) for line in open(ROOT / "manifests/demo/test.jsonl")][:clips]
    for r in demo:
        rows.append({**r, "audio_filepath": str(ROOT / "manifests/demo" / r["audio_filepath"])})
    manifest = folder / "manifest.jsonl"
    manifest.write_text("".join(json.dumps(r) + "\n" for r in rows))
    import soundfile as sf

    seconds = sum(sf.info(r["audio_filepath"]).duration for r in rows)
    return manifest, seconds


def one_run(spec: dict, folder: Path, name: str, workers: int, cache: Path) -> dict:
    out = folder / name
    path = folder / f"{name}.yaml"
    path.write_text(json.dumps({**spec, "output": str(out), "workers": workers}))
    env = {**os.environ, "ASR_RUNNER_CACHE": str(cache)}
    t0 = time.time()
    proc = subprocess.run(
        [str(ROOT / ".venv/bin/asr-runner"), "run", str(path), "--quiet"], env=env, capture_output=True, text=True
    )
    wall = time.time() - t0
    if proc.returncode != 0:
        raise SystemExit(f"{name} failed (exit {proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    stats = json.loads((out / "stats.json").read_text())
    return {
        "name": name,
        "workers": workers,
        "split": bool(spec.get("split_seconds", 1)),
        "wall_seconds": round(wall, 2),
        "total_seconds": stats["total_seconds"],
        "startup_seconds": stats["startup_seconds"],
        "dispatch_seconds": stats["wall_seconds"],
        "rtfx_dispatch": stats["rtfx"],
        "split_stats": stats.get("split"),
        "stages": stats.get("stages"),
        "out": str(out),
    }


def summary(values: list[float]) -> dict:
    return {"median": round(statistics.median(values), 2), "min": round(min(values), 2), "max": round(max(values), 2)}


def accuracy(split_out: str, whole_out: str) -> dict:
    from runner.job.run_folder import read_rows
    from runner.metrics import wer

    split = {r["id"]: r for r in read_rows(Path(split_out)).to_pylist()}
    whole = {r["id"]: r for r in read_rows(Path(whole_out)).to_pylist()}
    files = {}
    for key, row in split.items():
        if not row["segments"]:
            continue
        other = whole[key]
        same_times = [(w["word"], w["start"], w["end"]) for w in row["words"] or []] == [
            (w["word"], w["start"], w["end"]) for w in other["words"] or []
        ]
        files[key] = {
            "wer_split_vs_whole": round(wer([other["text"]], [row["text"]]), 5),
            "identical_text": row["text"] == other["text"],
            "identical_word_times": same_times,
            "wer_vs_reference": round(wer([row["reference"]], [row["text"]]), 4) if row["reference"] else None,
            "words": len(row["text"].split()),
            "cuts": [[round(s["start"], 2), round(s["end"], 2), s["cut"]] for s in row["segments"]],
        }
    refs = [whole[k]["text"] for k in files]
    hyps = [split[k]["text"] for k in files]
    return {"wer_split_vs_whole": round(wer(refs, hyps), 5) if refs else None, "files": files}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--minutes", type=float, default=16.0)
    parser.add_argument("--files", type=int, default=1)
    parser.add_argument("--clips", type=int, default=3)
    parser.add_argument("--workers", default="1,2")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--model", default="demo")
    parser.add_argument("--precision", default="int8")
    parser.add_argument("--segment-seconds", type=float, default=120.0)
    parser.add_argument("--out", default=str(ROOT / "benchmarks/results"))
    args = parser.parse_args()
    counts = [int(n) for n in args.workers.split(",")]

    from runner.sysinfo import cpu_info, int8_flags

    cpu = {"model": cpu_info()["model"], "int8_flags": int8_flags(), "cores": os.cpu_count()}
    print(f"CPU {cpu['model']}, {cpu['cores']} logical CPUs, int8 flags: {', '.join(cpu['int8_flags']) or 'none'}")
    if max(counts) > (os.cpu_count() or 1):
        print(f"note: {max(counts)} workers on {os.cpu_count()} CPUs: Ray queues the surplus ones")
    with tempfile.TemporaryDirectory(prefix="split-scaling-") as tmp:
        tmp = Path(tmp)
        model = model_file(args.model, tmp)
        manifest, audio = write_manifest(tmp, args.minutes, args.files, args.clips)
        spec = {
            "model": str(model),
            "manifest": str(manifest),
            "precision": args.precision,
            "threads_per_worker": 1,
            "segment_seconds": args.segment_seconds,
            "split_seconds": max(300.0, args.segment_seconds),
            "quantization": {"calibration_manifest": str(ROOT / "manifests/demo/calibration.jsonl")},
        }
        if args.model != "demo":
            spec["quantization"] = {}
        cache = tmp / "cache"
        if args.precision == "int8":  # made once, untimed: every timed run finds it cached
            one_run({**spec, "split_seconds": 0}, tmp, "warm-up", 1, cache)
        runs = []
        for r in range(args.runs):
            order = counts if r % 2 == 0 else counts[::-1]
            for n in order:
                res = one_run(spec, tmp, f"split-{n}w-{r}", n, cache)
                runs.append(res)
                print(
                    f"run {r}: {n} worker(s), split: wall {res['wall_seconds']:.1f} s, dispatch "
                    f"{res['dispatch_seconds']:.1f} s (RTFx {res['rtfx_dispatch']})",
                    flush=True,
                )
            whole = one_run({**spec, "split_seconds": 0}, tmp, f"whole-{max(counts)}w-{r}", max(counts), cache)
            runs.append(whole)
            print(
                f"run {r}: {max(counts)} worker(s), not split: wall {whole['wall_seconds']:.1f} s, "
                f"dispatch {whole['dispatch_seconds']:.1f} s",
                flush=True,
            )
        last = [x for x in runs if x["split"] and x["workers"] == max(counts)][-1]
        acc = accuracy(last["out"], runs[-1]["out"])
    configs = {}
    for n in counts:
        mine = [x for x in runs if x["split"] and x["workers"] == n]
        configs[f"split, {n} workers"] = {
            "wall": summary([x["wall_seconds"] for x in mine]),
            "dispatch": summary([x["dispatch_seconds"] for x in mine]),
        }
    mine = [x for x in runs if not x["split"]]
    configs[f"not split, {max(counts)} workers"] = {
        "wall": summary([x["wall_seconds"] for x in mine]),
        "dispatch": summary([x["dispatch_seconds"] for x in mine]),
    }
    base = configs[f"split, {counts[0]} workers"]
    scaling = {}
    for n in counts[1:]:
        c = configs[f"split, {n} workers"]
        wall = base["wall"]["median"] / c["wall"]["median"]
        dispatch = base["dispatch"]["median"] / c["dispatch"]["median"]
        ratio = n / counts[0]
        scaling[n] = {
            "speedup_wall": round(wall, 2),
            "speedup_dispatch": round(dispatch, 2),
            "efficiency_wall": round(wall / ratio, 3),
            "efficiency_dispatch": round(dispatch / ratio, 3),
        }
    result = {
        "model": args.model,
        "precision": args.precision,
        "audio_seconds": round(audio, 1),
        "long_files": args.files,
        "minutes_each": args.minutes,
        "segment_seconds": args.segment_seconds,
        "cpu": cpu,
        "statistic": "median of runs (min, max): process wall clock and stats.json dispatch seconds; alternated",
        "configs": configs,
        "scaling": scaling,
        "accuracy": acc,
        "runs": [{k: v for k, v in x.items() if k != "out"} for x in runs],
    }
    print(
        f"{args.model} {args.precision}, {args.files} x {args.minutes:g} min + {args.clips} clips "
        f"({audio / 60:.1f} min of audio), segments of {args.segment_seconds:g} s"
    )
    for name, c in configs.items():
        w, d = c["wall"], c["dispatch"]
        print(
            f"  {name}: wall {w['median']:.1f} s ({w['min']:.1f}-{w['max']:.1f}), "
            f"dispatch {d['median']:.1f} s ({d['min']:.1f}-{d['max']:.1f})"
        )
    for n, s in scaling.items():
        print(
            f"  {n} vs {counts[0]} workers: {s['speedup_wall']:.2f}x wall ({s['efficiency_wall']:.0%}), "
            f"{s['speedup_dispatch']:.2f}x dispatch ({s['efficiency_dispatch']:.0%})"
        )
    print(f"  split vs whole-file transcripts: WER {acc['wer_split_vs_whole']}")
    for key, f in acc["files"].items():
        kinds = [c[2] for c in f["cuts"]]
        print(
            f"    {key}: WER {f['wer_split_vs_whole']}, identical text {f['identical_text']}, identical word times "
            f"{f['identical_word_times']}, {len(kinds)} segments ({kinds.count('pause')} cut at pauses, "
            f"{kinds.count('forced')} forced)"
        )
    folder = Path(args.out)
    folder.mkdir(parents=True, exist_ok=True)
    workers = "-".join(map(str, counts))
    name = f"split_scaling-{args.model}-{args.precision}-{args.files}x{args.minutes:g}min-{workers}w.json"
    (folder / name).write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {folder / name}")


if __name__ == "__main__":
    main()
