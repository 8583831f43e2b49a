"""vs_peers.py's runner jobs: one job with its CPU accounting, and the 1 vs N workers scaling runs.

`job`: a runner job (local Ray, single-thread workers) with the CPU seconds of each kind of process
(`CpuAccounting`) and the workers' peak RSS added to its stats; `scaling`: rounds of the int8 job
with each worker count, then the same worker code in plain processes (`raw_processes`, the ceiling);
`paired`: the speed-up as the median of the rounds' ratios (see vs_peers.py's docstring).
"""

from __future__ import annotations

import os
import statistics
import time
from pathlib import Path

from repeat_manifest import repeated_manifest

from runner.inputs.manifest import iter_manifest
from runner.job.run import run_job
from runner.job.spec import JobSpec


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
