"""Where to cut a long recording: our energy pause finder vs silero-vad, by measurement (issue 20).

    .venv/bin/python benchmarks/split_points.py [--files 3] [--minutes 10] [--segment-seconds 60]
        [--search 10] [--methods energy,silero-onnx,silero-seq,silero-jit] [--audio DIR] [--out benchmarks/results]

Recordings: `--files` espeak-ng long recordings of `--minutes` each (`runner.training.long_recording`,
seeds 300, 301, ...; 0.25-1.2 s pauses between sentences), with the exact (start, end) of every pause
between sentences as ground truth. Conditions, made here on the samples (the pauses stay where they are):
clean; white noise at 30, 20, 10 and 5 dB speech-to-noise; a steady 50 Hz hum with harmonics at 10 dB;
a music-like background (3-note chords of harmonic tones, a new chord every 0.5 s, each note decaying)
at 10 dB. Speech power: the mean square over the sentences (everything outside the pauses).

Cuts: a target every `--segment-seconds` (`runner.inputs.split.targets`), searched within `--search` s
of it (a quarter of the segment at most), the same stretch of samples `split_line` reads. Methods:
- energy: `runner.inputs.split.pause_cut` on that stretch (what the runner does).
- silero-onnx, silero-seq, silero-jit: silero-vad (6.2.3 here; its weights ship inside the package) on
  the same stretch, each of its own three ways: the ONNX model through ONNX Runtime one 32 ms frame
  per call (`load_silero_vad(onnx=True)`), its "sequence" ONNX model, up to 512 frames per call
  (`load_silero_vad(sequence=True)`, `get_speech_timestamps_sequence`), and the TorchScript model one
  frame per call (the default). Speech chunks from `min_silence_duration_ms=150, speech_pad_ms=0`; the
  gaps between them (the stretch's edges included) of at least MIN_PAUSE_SECONDS are pauses; the
  longest wins, nearest the target on a tie, cut at its middle; no gap: forced at the target (as ours).
All single-threaded (torch.set_num_threads(1), ONNX Runtime intra/inter-op threads 1). Each method is
warmed up on one stretch first (untimed; its model load is timed apart); per cut, the methods run in
one order, then in the reverse for the next cut.

Statistic, fixed before the runs. Accuracy: counts over all cuts of a condition: a cut is "in a pause"
when it lies in a ground-truth pause widened by 0.1 s on each side (espeak leaves ~0.15 s of
near-silence around each sentence after trimming), else "inside speech"; "forced" counts the cuts
where the method found no pause (they land wherever the target lies). Cost: the median over cuts of
the per-cut detection time (reading the audio excluded), with min and max; x real time = the median
over cuts of (scanned seconds / detection seconds).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from importlib.metadata import version
from pathlib import Path

import numpy as np
import soundfile as sf

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from runner.inputs.split import MIN_PAUSE_SECONDS, pause_cut, targets  # noqa: E402

WIDEN = 0.1  # seconds added to each side of a ground-truth pause
CONDITIONS = [  # (name, background, speech-to-background dB)
    ("clean", None, None),
    ("white 30 dB", "white", 30.0),
    ("white 20 dB", "white", 20.0),
    ("white 10 dB", "white", 10.0),
    ("white 5 dB", "white", 5.0),
    ("hum 10 dB", "hum", 10.0),
    ("music-like 10 dB", "music", 10.0),
]


def recordings(folder: Path, files: int, minutes: float) -> list[dict]:
    """The long recordings (reused from `folder` when there) with their ground-truth pauses."""
    from runner.training.long_recording import long_recording

    out = []
    for k in range(files):
        path, truth = folder / f"talk{k}-{minutes:g}min.flac", folder / f"talk{k}-{minutes:g}min.pauses.json"
        if not (path.exists() and truth.exists()):
            pauses: list = []
            long_recording(path, minutes * 60, seed=300 + k, pauses=pauses)
            truth.write_text(json.dumps(pauses))
        samples, rate = sf.read(path, dtype="float32")
        pauses = np.array(json.loads(truth.read_text()))
        out.append({"name": path.stem, "samples": samples, "rate": rate, "pauses": pauses})
    return out


def background(kind: str, n: int, rate: int, rng: np.random.Generator) -> np.ndarray:
    t = np.arange(n) / rate
    if kind == "white":
        return rng.standard_normal(n)
    if kind == "hum":
        return sum(np.sin(2 * np.pi * 50 * h * t + rng.uniform(0, 2 * np.pi)) / h for h in range(1, 5))
    x, step = np.zeros(n), int(0.5 * rate)  # music-like: a new 3-note chord every 0.5 s, notes decaying
    local = np.arange(step) / rate
    for first in range(0, n, step):
        m = min(step, n - first)
        for semis in rng.choice(np.array([0, 3, 5, 7, 10, 12, 15, 17, 19, 22]), 3, replace=False):
            f = 220.0 * 2 ** (semis / 12)
            tone = sum(np.sin(2 * np.pi * f * h * local[:m]) / h**2 for h in (1, 2, 3))
            x[first : first + m] += tone * np.exp(-4.0 * local[:m])
    return x


def condition_samples(rec: dict, kind: str | None, snr_db: float | None, seed: int) -> np.ndarray:
    clean = rec["samples"].astype(np.float64)
    if kind is None:
        return rec["samples"]
    speech = np.ones(len(clean), bool)
    for start, end in rec["pauses"]:
        speech[int(start * rec["rate"]) : int(end * rec["rate"])] = False
    power = float(np.mean(clean[speech] ** 2))
    noise = background(kind, len(clean), rec["rate"], np.random.default_rng(seed))
    noise *= np.sqrt(power / (10 ** (snr_db / 10)) / np.mean(noise**2))
    return (clean + noise).astype(np.float32)


def energy_cut(block: np.ndarray, rate: int, target: int) -> int | None:
    return pause_cut(block, rate, target)


def silero_cutter(kind: str):
    """A cut function over silero-vad's speech timestamps (`kind`: onnx, jit or seq), and the seconds its
    model took to load (silero_vad's import included; torch was imported before)."""
    import torch

    torch.set_num_threads(1)
    t0 = time.perf_counter()
    import silero_vad

    # the ONNX models open their sessions with 1 intra- and 1 inter-op thread
    model = silero_vad.load_silero_vad(onnx=kind == "onnx", sequence=kind == "seq")
    load = time.perf_counter() - t0
    options = {"min_silence_duration_ms": 150, "speech_pad_ms": 0}

    def cut(block: np.ndarray, rate: int, target: int) -> int | None:
        if kind == "seq":  # numpy in, one ONNX call per 512 frames (16.4 s)
            speech = silero_vad.get_speech_timestamps_sequence(block, model, sampling_rate=rate, **options)
        else:  # one call per 512-sample frame
            speech = silero_vad.get_speech_timestamps(torch.from_numpy(block), model, sampling_rate=rate, **options)
        bounds = [0] + [x for s in speech for x in (s["start"], s["end"])] + [len(block)]
        gaps = [(a, b) for a, b in zip(bounds[::2], bounds[1::2]) if b - a >= MIN_PAUSE_SECONDS * rate]
        if not gaps:
            return None
        a, b = min(gaps, key=lambda g: (-(g[1] - g[0]), abs((g[0] + g[1]) // 2 - target)))
        return (a + b) // 2

    return cut, load


def in_pause(at: float, pauses: np.ndarray) -> bool:
    return bool(np.any((pauses[:, 0] - WIDEN <= at) & (at <= pauses[:, 1] + WIDEN)))


def summary(values: list[float], digits: int = 2) -> dict:
    return {
        "median": round(statistics.median(values), digits),
        "min": round(min(values), digits),
        "max": round(max(values), digits),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--files", type=int, default=3)
    parser.add_argument("--minutes", type=float, default=10.0)
    parser.add_argument("--segment-seconds", type=float, default=60.0)
    parser.add_argument("--search", type=float, default=10.0)
    parser.add_argument("--methods", default="energy,silero-onnx,silero-seq,silero-jit")
    parser.add_argument("--audio", help="keep the recordings here (reused by later runs); default: a temp dir")
    parser.add_argument("--out", default=str(ROOT / "benchmarks/results"))
    args = parser.parse_args()
    names = args.methods.split(",")

    from runner.sysinfo import cpu_info, int8_flags

    cpu = {"model": cpu_info()["model"], "int8_flags": int8_flags(), "cores": os.cpu_count()}
    print(f"CPU {cpu['model']}, {cpu['cores']} logical CPUs, int8 flags: {', '.join(cpu['int8_flags']) or 'none'}")
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="split-points-") as tmp:
        folder = Path(args.audio or tmp)
        folder.mkdir(parents=True, exist_ok=True)
        recs = recordings(folder, args.files, args.minutes)
    audio = sum(len(r["samples"]) / r["rate"] for r in recs)
    widened = sum(
        min(e + WIDEN, len(r["samples"]) / r["rate"]) - max(s - WIDEN, 0) for r in recs for s, e in r["pauses"]
    )
    chance = widened / audio  # how often a cut at a random time lands in a (widened) pause
    print(f"{len(recs)} recordings, {audio / 60:.1f} min, ready in {time.perf_counter() - t0:.0f} s", flush=True)

    methods, loads = {}, {}
    for name in names:
        if name == "energy":
            methods[name], loads[name] = energy_cut, 0.0
        else:
            methods[name], loads[name] = silero_cutter(name.removeprefix("silero-"))
    search = min(args.search, args.segment_seconds / 4)
    warm = recs[0]["samples"][: int(2 * search * recs[0]["rate"])]
    for cut in methods.values():  # first calls (JIT profiling, ORT allocations) are not timed
        cut(warm, recs[0]["rate"], len(warm) // 2)

    results: dict = {}
    for c, (cond, kind, snr) in enumerate(CONDITIONS):
        rows = {name: [] for name in names}
        for k, rec in enumerate(recs):
            samples, rate = condition_samples(rec, kind, snr, seed=1000 * c + k), rec["rate"]
            duration = len(samples) / rate
            for i, target in enumerate(targets(duration, args.segment_seconds)):
                lo, hi = max(0.0, target - search), min(duration, target + search)
                first = int(round(lo * rate))
                block = samples[first : first + int(round((hi - lo) * rate))]
                order = names if (i + k) % 2 == 0 else names[::-1]
                for name in order:
                    t1 = time.perf_counter()
                    at = methods[name](block, rate, int(round((target - lo) * rate)))
                    spent = time.perf_counter() - t1
                    where = target if at is None else lo + at / rate
                    rows[name].append(
                        {
                            "file": rec["name"],
                            "target": round(target, 3),
                            "cut": round(where, 3),
                            "forced": at is None,
                            "in_pause": in_pause(where, rec["pauses"]),
                            "seconds": spent,
                            "scanned": len(block) / rate,
                        }
                    )
        results[cond] = {}
        for name, cuts in rows.items():
            n = len(cuts)
            ms = [x["seconds"] * 1000 for x in cuts]
            results[cond][name] = {
                "cuts": n,
                "in_pause": sum(x["in_pause"] for x in cuts),
                "forced": sum(x["forced"] for x in cuts),
                "inside_speech": sum(not x["in_pause"] for x in cuts),
                "inside_speech_not_forced": sum(not x["in_pause"] and not x["forced"] for x in cuts),
                "ms_per_cut": summary(ms, 3),
                "x_real_time": round(statistics.median(x["scanned"] / x["seconds"] for x in cuts), 1),
                "cut_list": [{k: v for k, v in x.items() if k != "seconds"} for x in cuts],
            }
        print(f"{cond}: done", flush=True)

    print(
        f"\n{args.files} x {args.minutes:g} min, a cut every {args.segment_seconds:g} s searched +-{search:g} s; "
        f"CPU {cpu['model']}, 1 thread; a cut at a random time lands in a widened pause {chance:.0%} of the time"
    )
    head = f"{'condition':<17} {'method':<12} {'in pause':>9} {'forced':>7} {'in speech':>10} (unforced)"
    print(head + f" {'ms per cut: median (min-max)':>32} {'x real time':>12}")
    for cond, per in results.items():
        for name, r in per.items():
            n, t = r["cuts"], r["ms_per_cut"]
            print(
                f"{cond:<17} {name:<12} {r['in_pause'] / n:>9.0%} {r['forced'] / n:>7.0%} "
                f"{r['inside_speech'] / n:>10.0%} ({r['inside_speech_not_forced']:>2}/{n})"
                f" {t['median']:>12.2f} ({t['min']:.2f}-{t['max']:.2f}){'':>3} {r['x_real_time']:>11,.0f}x"
            )
    print("model load (once per process): " + ", ".join(f"{k} {v:.2f} s" for k, v in loads.items()))
    import onnxruntime
    import torch

    result = {
        "cpu": cpu,
        "versions": {
            "torch": torch.__version__,
            "onnxruntime": onnxruntime.__version__,
            "silero-vad": version("silero-vad"),
        },
        "files": args.files,
        "minutes_each": args.minutes,
        "segment_seconds": args.segment_seconds,
        "search_seconds": search,
        "widen_seconds": WIDEN,
        "audio_seconds": round(audio, 1),
        "random_cut_in_pause": round(chance, 4),
        "statistic": "accuracy: counts over all cuts; cost: median over cuts of per-cut detection ms (min, max), "
        "x real time = median over cuts of scanned seconds / detection seconds; single thread",
        "model_load_seconds": {k: round(v, 3) for k, v in loads.items()},
        "conditions": results,
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"split_points-{args.files}x{args.minutes:g}min-{args.segment_seconds:g}s.json"
    path.write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
