"""The int8 job against what a user would run instead, with stages, scaling, memory (issue 7).

    .venv/bin/python benchmarks/vs_peers.py [--repeat 5] [--threads 2] [--clips 8] [--quick]
        [--out benchmarks/results]

Prints figures and a table of the issue's targets, writes JSON and a PNG; not a test. One run,
one machine, QuartzNet15x5 architecture (random weights, BN statistics randomized: transcripts
are noise, speed is what counts), one manifest (the demo test set repeated `--repeat` times with
new ids; 5 x 271 s = 22.6 min of espeak-ng speech):
- end to end: NeMo's own `model.transcribe()` fp32 (batch 8, `--threads` threads, in this process,
  model already loaded) vs the runner's fp32 job and int8 job (`auto` engine; Ray, one
  single-thread worker per CPU). RTFx = audio seconds / wall seconds (runner: first shard
  dispatched -> last part written; NeMo: the `transcribe()` call);
- the int8 job's per-stage breakdown (stats.json `stages`), worker peak RSS, start-up the first
  time (quantization + gate: `int8_cold`) and with the artifact cached;
- scaling: the int8 job with 1 and with N workers on a longer manifest (`--scaling-repeat`, so that
  start and tail weigh little), `--scaling-rounds` rounds of a 1-worker run followed by an
  N-worker run. The speed-up is the median of the rounds' ratios: this machine's speed drifts by
  10-30% over minutes (one run: 1-worker runs at 101.6, 105.6 and 138.0), and a ratio of runs
  made back to back cancels that, where the best run of each kind compares different minutes
  (printed too, as `best of each`). The same for the ceiling, the worker code in plain processes;
- encoder + decoder alone on precomputed features of 10 s utterances, batch 1 and 8, `--threads`
  threads, interleaved best of 3 (`lean_model.rtfx_pair`): eager fp32, eager int8 `onednn` (the
  job's own artifact), ONNX Runtime fp32 and int8 static QDQ per-channel of the same weights.
Needs the `bench` extra (onnxruntime, onnxscript). The relaxed gate (`--max-wer-increase`) is
there because random weights make every transcript noise.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from lean_model import rtfx_pair, ten_second_utterances  # noqa: E402

from runner.inputs.manifest import iter_manifest  # noqa: E402
from runner.int8.artifact import build_int8_model  # noqa: E402
from runner.job.run import run_job  # noqa: E402
from runner.job.spec import JobSpec  # noqa: E402
from runner.model.ctc import build_model  # noqa: E402
from runner.model.nemo_loader import describe, quiet_nemo_logging  # noqa: E402
from runner.sysinfo import cpu_info  # noqa: E402
from runner.training.corpus import sentences, synthesize_many  # noqa: E402
from runner.training.recipes import build_nemo_model, quartznet15x5_config, randomize_batchnorm  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def repeated_manifest(src: Path, repeat: int, path: Path) -> tuple[list[str], float]:
    """`src` repeated `repeat` times with new ids; returns the audio paths and audio seconds."""
    items = list(iter_manifest(str(src)))
    paths, seconds = [], 0.0
    with open(path, "w") as f:
        for r in range(repeat):
            for item in items:
                f.write(
                    json.dumps(
                        {
                            "audio_filepath": item.audio_filepath,
                            "duration": item.duration,
                            "text": item.text,
                            "id": f"r{r}-{item.id}",
                        }
                    )
                    + "\n"
                )
                paths.append(item.audio_filepath)
                seconds += item.duration
    return paths, seconds


def nemo_transcribe(nemo, paths: list[str], seconds: float) -> dict:
    """NeMo's own `transcribe()` over the files, fp32, batch 8 (after a small warm-up call)."""
    nemo.eval()
    nemo.transcribe(paths[:8], batch_size=8, verbose=False)
    t0 = time.perf_counter()
    nemo.transcribe(paths, batch_size=8, verbose=False, num_workers=0)
    wall = time.perf_counter() - t0
    print(f"  NeMo transcribe(): {wall:.1f} s", flush=True)
    return {"wall_seconds": round(wall, 2), "audio_seconds": round(seconds, 2), "rtfx": round(seconds / wall, 2)}


def spec_dict(model: str, manifest: Path, out: Path, precision: str, workers: int, quant: dict) -> dict:
    return {
        "model": model,
        "manifest": str(manifest),
        "output": str(out),
        "precision": precision,
        "workers": workers,
        "threads_per_worker": 1,
        "shard_seconds": 120,
        "quantization": quant,
    }


def scaling(model: str, src: Path, tmp: Path, counts: list[int], quant: dict, repeat: int, rounds: int) -> dict:
    """int8 job RTFx with each worker count in `counts` (1 first) on `src` x `repeat`, `rounds` rounds
    of one run per count, with the artifact the main int8 job made (copied to the cache key of this
    manifest: no new quantization); then the same counts as plain processes."""
    from runner.int8.cache import cache_dir
    from runner.int8.make import cache_key

    manifest = tmp / "scaling.jsonl"
    _paths, seconds = repeated_manifest(src, repeat, manifest)
    spec = JobSpec.from_dict(spec_dict(model, manifest, tmp / "x", "int8", counts[-1], quant))
    (made,) = cache_dir().glob("int8-*.pt")
    key = cache_key(spec.model, spec.manifest, spec.quantization.calibration_manifest, spec.quantization.settings())
    (cache_dir() / f"int8-{key[:32]}.pt").write_bytes(made.read_bytes())
    runs: dict[int, list[float]] = {w: [] for w in counts}
    cpu: dict[int, dict] = {}
    for k in range(rounds):
        for w in runs:
            stats = job(model, manifest, tmp / f"scale-{w}w-{k}", "int8", w, quant)
            runs[w].append(stats["rtfx"])
            if stats["rtfx"] == max(runs[w]):
                cpu[w] = {**stats["cpu_seconds"], "wall": stats["wall_seconds"]}
    artifact = made.read_bytes()
    raw: dict[int, list[float]] = {w: [] for w in counts}
    for _ in range(rounds):
        for w in raw:
            raw[w].append(raw_processes(artifact, spec, w))
    n = counts[-1]
    return {
        "audio_seconds": round(seconds, 1),
        "repeat": repeat,
        "workers": counts,
        "runs": {str(w): v for w, v in runs.items()},
        "best": {str(w): max(v) for w, v in runs.items()},
        **paired(runs, n),
        "speedups": {str(w): paired(runs, w)["speedup"] for w in counts},
        "cpu_seconds_of_best": {str(w): v for w, v in cpu.items()},
        "raw_runs": {str(w): v for w, v in raw.items()},
        "raw_processes": {str(w): max(v) for w, v in raw.items()},
        **{f"raw_{k}": v for k, v in paired(raw, n).items()},
        "raw_speedups": {str(w): paired(raw, w)["speedup"] for w in counts},
    }


def paired(runs: dict, n: int) -> dict:
    """Speed-up of n workers over 1: the median of the rounds' ratios (runs made back to back), and
    the ratio of the best run of each kind."""
    ratios = [round(b / a, 3) for a, b in zip(runs[1], runs[n])]
    return {
        "speedup": round(statistics.median(ratios), 3),
        "round_ratios": ratios,
        "best_of_each_speedup": round(max(runs[n]) / max(runs[1]), 3),
    }


_WORKER = None


def _raw_init(artifact: bytes, barrier) -> None:
    global _WORKER
    from runner.job.worker import Int8Payload, ShardWorker
    from runner.model.transcribe import DecodeOptions

    _WORKER = ShardWorker(Int8Payload(artifact, "auto"), 1, DecodeOptions())
    barrier.wait()


def _raw_shard(task) -> float:
    return _WORKER(*task).audio_seconds


def raw_processes(artifact: bytes, spec: JobSpec, workers: int) -> float:
    """The ceiling for the job's scaling: the same worker code (`ShardWorker`, 1 thread, `auto`) in
    `workers` plain processes pulling the same shards, no Ray, no driver writing Parquet. Returns
    RTFx from the first shard handed out (every process has built its model) to the last result."""
    import multiprocessing as mp

    from runner.job.run import prepare
    from runner.job.shards import group_items

    plan = prepare(spec)
    tasks = [
        (shard.index, batch)
        for shard, batch in group_items(iter_manifest(spec.manifest), plan.shards, {s.index for s in plan.shards})
    ]
    ctx = mp.get_context("spawn")
    barrier = ctx.Barrier(workers + 1)
    with ctx.Pool(workers, initializer=_raw_init, initargs=(artifact, barrier)) as pool:
        barrier.wait()
        t0 = time.perf_counter()
        audio = sum(pool.imap_unordered(_raw_shard, tasks))
        wall = time.perf_counter() - t0
    print(f"  raw processes x{workers}: RTFx {audio / wall:.1f}", flush=True)
    return round(audio / wall, 2)


class CpuAccounting:
    """CPU seconds each kind of process spent between the workers being ready and the last part
    written (psutil over every process on the machine): the workers' actors, the driver (this
    process), Ray's own daemons, everything else. Where a 2-core machine's second worker loses."""

    def __init__(self):
        self.start: dict[int, tuple[str, float]] = {}
        self.end: dict[int, tuple[str, float]] = {}

    @staticmethod
    def _snapshot() -> dict[int, tuple[str, float]]:
        import psutil

        snap = {}
        for proc in psutil.process_iter(["pid", "name", "cmdline", "cpu_times"]):
            times, cmd = proc.info["cpu_times"], " ".join(proc.info["cmdline"] or []) or proc.info["name"] or ""
            if times is not None:
                snap[proc.info["pid"]] = (cmd, times.user + times.system)
        return snap

    def __call__(self, kind: str, **_data) -> None:
        if kind == "workers":
            self.start = self._snapshot()
        elif kind == "shard":
            self.end = self._snapshot()

    def seconds(self) -> dict[str, float]:
        out = {"workers": 0.0, "driver": 0.0, "ray_daemons": 0.0, "other": 0.0}
        for pid, (cmd, cpu) in self.end.items():
            used = cpu - self.start.get(pid, (cmd, 0.0))[1]
            if pid == os.getpid():
                kind = "driver"
            elif "ShardWorker" in cmd:  # Ray titles an actor's process ray::ShardWorker[.method]
                kind = "workers"
            elif any(
                k in cmd
                for k in (
                    "raylet",
                    "gcs_server",
                    "dashboard",
                    "log_monitor",
                    "ray/_private",
                    "default_worker.py",
                    "ray::IDLE",
                    "runtime_env",
                )
            ):
                kind = "ray_daemons"
            else:
                kind = "other"
            out[kind] += max(used, 0.0)
        return {k: round(v, 2) for k, v in out.items()}


def job(model: str, manifest: Path, out: Path, precision: str, workers: int, quant: dict) -> dict:
    spec = JobSpec.from_dict(spec_dict(model, manifest, out, precision, workers, quant))
    cpu = CpuAccounting()
    stats = run_job(spec, on_event=cpu).stats
    stats["cpu_seconds"] = cpu.seconds()
    stats["peak_rss_mb"] = max((w.get("peak_rss_mb", 0.0) for w in stats["worker_info"].values()), default=None)
    stats.pop("quantization", None)
    print(f"  {out.name}: RTFx {stats['rtfx']}, startup {stats['startup_seconds']} s", flush=True)
    return stats


class EncoderLogits(torch.nn.Module):
    """features [B, F, T] (no padding) -> decoder logits [B, C, T']: the graph ONNX Runtime runs."""

    def __init__(self, lean):
        super().__init__()
        self.encoder, self.decoder = lean.encoder, lean.decoder

    def forward(self, feats: torch.Tensor) -> torch.Tensor:
        lens = torch.full((feats.shape[0],), feats.shape[2], dtype=torch.long)
        return self.decoder(self.encoder(feats, lens)[0])


def onnx_sessions(lean, calibration: list[torch.Tensor], threads: int, folder: Path) -> dict:
    """ONNX Runtime fp32 and int8 (static QDQ, per-channel, calibrated on real features) sessions."""
    import onnxruntime as ort
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    fp32, pre, int8 = folder / "enc_fp32.onnx", folder / "enc_pre.onnx", folder / "enc_int8.onnx"
    example = calibration[0].unsqueeze(0)
    torch.onnx.export(
        EncoderLogits(lean).eval(),
        (example,),
        str(fp32),
        input_names=["feats"],
        output_names=["logits"],
        dynamic_axes={"feats": {0: "batch", 2: "time"}},
        dynamo=False,
    )
    quant_pre_process(str(fp32), str(pre))

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.feeds = iter([{"feats": f.unsqueeze(0).numpy()} for f in calibration])

        def get_next(self):
            return next(self.feeds, None)

    quantize_static(str(pre), str(int8), Reader(), quant_format=QuantFormat.QDQ, per_channel=True)
    options = ort.SessionOptions()
    options.intra_op_num_threads, options.inter_op_num_threads = threads, 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    return {
        name: ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        for name, path in (("ort_fp32", fp32), ("ort_int8", int8))
    }


def encoder_bench(lean, artifact: bytes, clips: int, threads: int, folder: Path) -> dict:
    """RTFx of encoder + decoder alone (features precomputed), batch 1 and 8, same process and audio."""
    int8 = build_int8_model(artifact, "onednn").model
    with torch.inference_mode():
        feats = [
            lean.features(torch.from_numpy(c).unsqueeze(0), torch.tensor([len(c)]))[0][0]
            for c in ten_second_utterances(clips)
        ]
        calib_audio = [a for _t, _v, a in synthesize_many(sentences(24, seed=9), seed=9)]
        calibration = [
            lean.features(torch.from_numpy(a).unsqueeze(0), torch.tensor([len(a)]))[0][0] for a in calib_audio
        ]
    sessions = onnx_sessions(lean, calibration, threads, folder)

    @torch.inference_mode()
    def eager(forward):
        def run(batch):
            x = torch.stack(batch)
            return forward(x, torch.full((x.shape[0],), x.shape[2], dtype=torch.long))

        return run

    def ort_run(session):
        return lambda batch: session.run(None, {"feats": torch.stack(batch).numpy()})

    fns = {
        "eager_fp32": eager(lambda x, n: lean.decoder(lean.encoder(x, n)[0])),
        "eager_int8_onednn": eager(int8.logits),
        **{name: ort_run(s) for name, s in sessions.items()},
    }
    return {f"b{b}": {k: round(v, 1) for k, v in rtfx_pair(fns, feats, b, repeats=3).items()} for b in (1, 8)}


def targets(r: dict) -> list[tuple[str, str, bool]]:
    """(target, measured, met) for the issue's targets on the 2-core machine."""
    e2e = r["jobs"]["int8"]["rtfx"] / r["nemo_transcribe"]["rtfx"]
    enc = r["encoder"]["b8"]["eager_int8_onednn"] / r["encoder"]["b8"]["ort_int8"]
    frac = r["jobs"]["int8"]["stage_fractions"]
    worst = max((k for k in frac if k != "encoder"), key=frac.get)
    n = r["scaling"].get("workers", [1, r["workers"]])[-1]
    scale = r["scaling"]["speedup"]
    need = 0.9 if n <= 2 else 0.85  # the issue: 2 workers >= 1.8x; 16 workers >= 85% efficiency
    return [
        ("int8 job >= 6x NeMo transcribe() fp32, end to end", f"{e2e:.2f}x", e2e >= 6),
        ("int8 encoder >= 1.25x ONNX Runtime int8, batch 8", f"{enc:.2f}x", enc >= 1.25),
        (
            "int8 job: no stage but the encoder > 20% of the time",
            f"largest: {worst} {100 * frac[worst]:.1f}%",
            frac[worst] <= 0.20,
        ),
        (f"{n} workers >= {need * n:.1f}x 1 worker", f"{scale:.2f}x", scale >= need * n),
    ]


def plot(r: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 2, figsize=(12, 8))
    jobs = r["jobs"]
    e2e = {
        "NeMo transcribe()\nfp32": r["nemo_transcribe"]["rtfx"],
        "runner fp32": jobs["fp32"]["rtfx"],
        "runner int8": jobs["int8"]["rtfx"],
    }
    axes[0, 0].bar(list(e2e), list(e2e.values()), color=["grey", "tab:blue", "tab:green"])
    axes[0, 0].set(title=f"End to end, {r['cpu']['logical_cpus']} CPUs (RTFx)", ylabel="x real time")
    names = list(r["encoder"]["b1"])
    x = np.arange(len(names))
    for k, b in enumerate(("b1", "b8")):
        axes[0, 1].bar(x + 0.4 * k - 0.2, [r["encoder"][b][n] for n in names], 0.4, label=f"batch {b[1:]}")
    axes[0, 1].set_xticks(x, [n.replace("_", "\n", 1) for n in names])
    axes[0, 1].set(title="Encoder + decoder on 10 s features (RTFx)", ylabel="x real time")
    axes[0, 1].legend()
    frac = jobs["int8"]["stage_fractions"]
    axes[1, 0].barh(list(frac), [100 * v for v in frac.values()], color="tab:green")
    axes[1, 0].axvline(20, color="red", ls="--", lw=1)
    axes[1, 0].set(title="int8 job: share of time per stage (see stats.py)", xlabel="%")
    workers, best = r["scaling"].get("workers", [1, r["workers"]]), r["scaling"]["best"]
    axes[1, 1].plot(workers, [best[str(w)] for w in workers], "o-", label="int8 job")
    raw = r["scaling"]["raw_processes"]
    axes[1, 1].plot(
        workers, [raw[str(w)] for w in workers], "s-", color="tab:orange", label="same worker code, plain processes"
    )
    axes[1, 1].plot(workers, [best["1"] * w for w in workers], "--", color="grey", label="linear")
    axes[1, 1].set(
        title=f"Scaling (RTFx by workers, {r['scaling']['audio_seconds'] / 60:.0f} min of audio)",
        xlabel="workers x 1 thread",
        xticks=workers,
    )
    axes[1, 1].legend()
    fig.suptitle(f"QuartzNet15x5 architecture, {r['audio_seconds'] / 60:.1f} min of audio; {r['cpu']['model']}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def print_report(r: dict) -> None:
    jobs, nemo = r["jobs"], r["nemo_transcribe"]
    print(
        f"QuartzNet15x5 architecture, {r['utterances']} utterances, {r['audio_seconds'] / 60:.1f} min of audio; "
        f"CPU {r['cpu']['model']} ({r['cpu']['logical_cpus']} logical, {', '.join(r['cpu']['flags'])}); "
        f"torch {r['torch']}, onnxruntime {r['onnxruntime']}; load average before {r['load_before']}, "
        f"after {r['load_after']}"
    )
    print(
        f"NeMo transcribe() fp32, batch 8, {r['threads']} threads: "
        f"RTFx {nemo['rtfx']:.1f} ({nemo['wall_seconds']:.1f} s)"
    )
    for name, s in jobs.items():
        print(
            f"runner {name:8}: RTFx {s['rtfx']:7.1f}  wall {s['wall_seconds']:6.1f} s  startup "
            f"{s['startup_seconds']:6.1f} s  engine {s['engine']:7} worker peak RSS {s['peak_rss_mb']} MB  "
            f"= {s['rtfx'] / nemo['rtfx']:.2f}x NeMo transcribe()"
        )
    print(
        f"int8 job ({r['workers']} workers) time by stage: "
        + ", ".join(
            f"{k} {v:.1f} s ({100 * jobs['int8']['stage_fractions'][k]:.1f}%)"
            for k, v in jobs["int8"]["stages"].items()
        )
    )
    print(
        f"cold start: int8 first time (quantize + gate) {jobs['int8_cold']['startup_seconds']:.1f} s, "
        f"artifact cached {jobs['int8']['startup_seconds']:.1f} s, fp32 {jobs['fp32']['startup_seconds']:.1f} s"
    )
    sc = r["scaling"]
    for w, x in sc.get("speedups", {}).items():
        if w not in ("1", str(sc.get("workers", [0])[-1])):
            print(
                f"  {w} workers: median ratio {x:.2f}x = efficiency {100 * x / int(w):.0f}% (plain processes "
                f"{sc['raw_speedups'][w]:.2f}x)"
            )
    n = str(sc.get("workers", [1, r["workers"]])[-1])
    print(
        f"scaling ({sc['audio_seconds'] / 60:.0f} min of audio; RTFx of 1 / {n} workers by round "
        f"{list(zip(sc['runs']['1'], sc['runs'][n]))}): ratios {sc.get('round_ratios')}, median "
        f"{sc['speedup']:.2f}x = efficiency {100 * sc['speedup'] / int(n):.0f}% (best of each: "
        f"{sc['best']['1']:.1f} -> {sc['best'][n]:.1f} = {sc.get('best_of_each_speedup', 0):.2f}x); the same worker "
        f"code in plain processes (no Ray, no driver): runs {sc.get('raw_runs', sc['raw_processes'])}, "
        f"{sc['raw_speedup']:.2f}x"
    )
    for w, c in sc["cpu_seconds_of_best"].items():
        print(
            f"  {w} worker(s), CPU seconds over the {c['wall']:.1f} s of dispatch: "
            + ", ".join(f"{k} {v:.1f}" for k, v in c.items() if k != "wall")
        )
    print(f"encoder + decoder, 10 s features, {r['threads']} threads (RTFx)   batch 1   batch 8")
    for name in r["encoder"]["b1"]:
        print(f"  {name:20} {r['encoder']['b1'][name]:8.1f} {r['encoder']['b8'][name]:9.1f}")
    print("targets:")
    for name, value, met in r["targets"]:
        print(f"  {'MET   ' if met else 'MISSED'} {name}: {value}")


def save(r: dict, out: Path, name: str) -> None:
    """Figures so far (written after each phase, so a late failure keeps them)."""
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{name}.json").write_text(json.dumps(r, indent=2))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--manifest", default=str(ROOT / "manifests/demo/test.jsonl"))
    parser.add_argument("--repeat", type=int, default=5, help="manifest repeats (5 x 271 s = 22.6 min)")
    parser.add_argument("--threads", type=int, default=2, help="threads of NeMo transcribe() and the encoder bench")
    parser.add_argument("--clips", type=int, default=8, help="10 s utterances for the encoder bench")
    parser.add_argument("--max-wer-increase", type=float, default=0.5)
    parser.add_argument(
        "--scaling-repeat",
        type=int,
        default=20,
        help="manifest repeats for the 1 vs N workers runs (20 x 271 s = 90 min)",
    )
    parser.add_argument("--scaling-rounds", type=int, default=3, help="1 and N worker runs alternated this often")
    parser.add_argument(
        "--scaling-workers",
        default="",
        help="worker counts to scale over, e.g. 1,2,4,8,16 on a 16-core machine (default: 1 and one per CPU)",
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help="a small run to check the script: 1 repeat, 30 calibration and gate items, 8 clips (not for figures)",
    )
    parser.add_argument("--out", default="benchmarks/results")
    parser.add_argument("--from-json", help="print the report and draw the plot of a saved run, measuring nothing")
    args = parser.parse_args()
    if args.from_json:
        r = json.loads(Path(args.from_json).read_text())
        sc, n = r["scaling"], r["workers"]
        if "round_ratios" not in sc:  # saved before the paired speed-up: derive it from the runs
            sc.update(paired({1: sc["runs"]["1"], n: sc["runs"][str(n)]}, n))
        r["targets"] = targets(r)
        Path(args.from_json).write_text(json.dumps(r, indent=2))
        print_report(r)
        plot(r, Path(args.from_json).with_suffix(".png"))
        return
    quiet_nemo_logging()
    torch.set_num_threads(args.threads)
    quant = {"max_wer_increase": args.max_wer_increase}
    if args.quick:
        args.repeat, args.clips, args.scaling_repeat, args.scaling_rounds = 1, 8, 2, 1
        quant.update(calibration_items=30, gate_items=30)
    import onnxruntime

    out, name = Path(args.out), "vs_peers_quick" if args.quick else "vs_peers"
    r = {
        "cpu": cpu_info(),
        "torch": torch.__version__,
        "onnxruntime": onnxruntime.__version__,
        "threads": args.threads,
        "workers": os.cpu_count() or 1,
        "repeat": args.repeat,
        "quick": args.quick,
        "load_before": [round(x, 2) for x in os.getloadavg()],
    }
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        os.environ["ASR_RUNNER_CACHE"] = str(tmp / "cache")  # the first int8 job is a cold start
        torch.manual_seed(0)
        nemo = build_nemo_model(quartznet15x5_config())
        randomize_batchnorm(nemo)
        model = str(tmp / "quartznet15x5.nemo")
        nemo.save_to(model)
        paths, seconds = repeated_manifest(Path(args.manifest), args.repeat, tmp / "manifest.jsonl")
        r.update(utterances=len(paths), audio_seconds=round(seconds, 1))
        lean = build_model(*describe(nemo))
        manifest, n = tmp / "manifest.jsonl", r["workers"]
        r["jobs"] = {
            "fp32": job(model, manifest, tmp / "fp32", "fp32", n, quant),
            "int8_cold": job(model, manifest, tmp / "int8-cold", "int8", n, quant),
            "int8": job(model, manifest, tmp / "int8", "int8", n, quant),
        }
        save(r, out, name)
        counts = (
            sorted({1, *(int(w) for w in args.scaling_workers.split(",") if w.strip())})
            if args.scaling_workers
            else sorted({1, n})
        )
        r["scaling"] = scaling(model, Path(args.manifest), tmp, counts, quant, args.scaling_repeat, args.scaling_rounds)
        save(r, out, name)
        artifact = next((tmp / "cache").glob("int8-*.pt")).read_bytes()
        r["encoder"] = encoder_bench(lean, artifact, args.clips, args.threads, tmp)
        save(r, out, name)
        # Last: NeMo's transcribe() changes process state (it leaves BatchNorm in training mode).
        r["nemo_transcribe"] = nemo_transcribe(nemo, paths, seconds)
    r["load_after"] = [round(x, 2) for x in os.getloadavg()]
    r["targets"] = targets(r)
    save(r, out, name)
    print_report(r)
    plot(r, out / f"{name}.png")
    print(f"wrote {out / name}.json and .png")


if __name__ == "__main__":
    main()
