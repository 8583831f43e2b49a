"""Run figures: what this invocation did (`RunTotals`, summed as it runs) and, from the Parquet parts,
the whole job's counts, audio seconds, RTFx, WER/CER and the CPU (`job_stats`: `stats.json`)."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from runner.job.run_folder import read_rows
from runner.job.spec import JobSpec
from runner.metrics import cer, normalize_text, wer
from runner.sysinfo import cpu_info

if TYPE_CHECKING:
    from runner.job.worker import ShardResult


@dataclass
class RunTotals:
    """What this invocation did: filled in by `runner.job.run` as the job goes, read by `job_stats`.
    Zeros and empty collections when nothing ran (a resume with every part done)."""

    started: float | None = None  # epoch seconds the user's command started: `total_seconds` counts from it
    quantize_seconds: float = 0.0  # int8 artifact made now; 0 when cached or fp32
    quantization: dict | None = None  # int8: artifact sha256, source, seconds, fp32 units, gate
    split: dict | None = None  # long lines split when the job was planned: lines, segments, cuts, seconds
    startup_seconds: float = 0.0  # run_job's start -> every worker up (ray, quantize/load)
    wall_seconds: float = 0.0  # first shard dispatched -> last part written
    workers: int = 0  # workers the job started with (replacements do not add to it)
    engines: dict[str, str] = field(default_factory=dict)  # worker -> engine, replacements included
    worker_info: dict[str, dict] = field(default_factory=dict)  # worker -> engine, timings, int8 check, ...
    worker_heavy_imports: list[str] = field(default_factory=list)  # what a worker should never have loaded
    audio_seconds: float = 0.0  # transcribed now (error rows excluded)
    compute_seconds: float = 0.0  # the workers' compute, summed over shards
    stages: dict[str, float] = field(default_factory=dict)  # seconds per worker stage, and the driver's `write`

    def add_shard(self, result: ShardResult, write_seconds: float) -> None:
        """Sum a shard's audio, compute and per-stage seconds, the driver's Parquet write, its worker's peak RSS."""
        for name, seconds in {**result.stages, "write": write_seconds}.items():
            self.stages[name] = self.stages.get(name, 0.0) + seconds
        self.compute_seconds += result.compute_seconds
        self.audio_seconds += result.audio_seconds
        info = self.worker_info.setdefault(result.worker, {})
        info["peak_rss_mb"] = max(info.get("peak_rss_mb", 0.0), result.peak_rss_mb)

    def rtfx(self) -> float | None:
        """Audio transcribed now over the dispatch's wall seconds."""
        return round(self.audio_seconds / self.wall_seconds, 2) if self.wall_seconds > 0 else None

    def user_clock(self) -> dict:
        """`total_seconds` (command start to now) and `rtfx_total`; nothing when the start is unknown."""
        if self.started is None:
            return {}
        total = time.time() - self.started
        return {
            "total_seconds": round(total, 3),
            "rtfx_total": round(self.audio_seconds / total, 2) if total > 0 else None,
        }

    def stage_breakdown(self) -> dict:
        """Where this invocation's time went: `stages` (seconds) and `stage_fractions` (of their sum).

        The worker-seconds available are workers x wall_seconds. Workers report seconds per stage
        (read, resample, features, encoder, decode) inside each shard's compute seconds; `other` is
        the rest of that compute (row bookkeeping). `ray_overhead` is what the workers did not spend
        computing: worker-seconds available minus the summed compute seconds (dispatch, result
        transfer, idle workers waiting for a shard or at the tail of the job). `write` is the driver's
        Parquet writing, which overlaps the workers' time; `split` the driver's search for pauses to cut
        long lines at, when it planned the job (before the workers start); fractions are of the sum of all
        stages.
        """
        if not self.stages:
            return {"stages": {}, "stage_fractions": {}}
        available = self.workers * self.wall_seconds
        worker = {k: v for k, v in self.stages.items() if k not in ("write", "split")}
        stages = {
            **worker,
            "other": max(0.0, self.compute_seconds - sum(worker.values())),
            "write": self.stages.get("write", 0.0),
            **({"split": self.stages["split"]} if "split" in self.stages else {}),
            "ray_overhead": max(0.0, available - self.compute_seconds),
        }
        total = sum(stages.values()) or 1.0
        return {
            "stages": {k: round(v, 3) for k, v in stages.items()},
            "stage_fractions": {k: round(v / total, 4) for k, v in stages.items()},
        }


def job_stats(spec: JobSpec, out: Path, totals: RunTotals) -> dict:
    """`stats.json` content. `audio_seconds` covers the whole job; `rtfx` the audio this invocation
    transcribed (`processed_audio_seconds`) over its dispatch `wall_seconds` (equal for a fresh run);
    `rtfx_total` the same audio over `total_seconds`, what the user waited."""
    table = read_rows(out, ["status", "duration", "text", "reference"])
    status = table["status"].to_pylist()
    ok = [s == "ok" for s in status]
    durations = table["duration"].to_pylist()
    refs, hyps = _scored_pairs(table, ok)
    engines = sorted(set(totals.engines.values())) or [_engine(spec)]
    return {
        "precision": spec.precision,
        "engine": engines[0] if len(engines) == 1 else "mixed",
        "engines": totals.engines,
        "workers": totals.workers or spec.workers,
        "threads_per_worker": spec.threads_per_worker,
        "utterances": len(status),
        "failed": len(status) - sum(ok),
        "audio_seconds": round(sum(d or 0.0 for d, k in zip(durations, ok) if k), 3),
        "processed_audio_seconds": round(totals.audio_seconds, 3),
        # the user's clock (command start to `_SUCCESS`), set by `run.finish`; the dispatch figures follow
        "total_seconds": None,
        "rtfx_total": None,
        "quantize_seconds": round(totals.quantize_seconds, 3),  # int8 made now; 0 when cached or fp32
        "startup_seconds": round(totals.startup_seconds, 3),
        "wall_seconds": round(totals.wall_seconds, 3),
        "rtfx": totals.rtfx(),
        "wer": round(wer(refs, hyps), 5) if refs else None,
        "cer": round(cer(refs, hyps), 5) if refs else None,
        "scored_utterances": len(refs),
        "cpu": cpu_info(),
        "worker_heavy_imports": totals.worker_heavy_imports,
        # per worker: engine, auto timings, int8 self-check, load seconds, CPU, peak RSS
        "worker_info": totals.worker_info,
        "int8_check": worst_int8_check(totals.worker_info),
        "quantization": totals.quantization,  # int8: artifact sha256, cache, fp32 units, gate
        # lines split into segments at plan time (`runner.inputs.split`): how many, the cuts (at a pause or
        # forced), and what finding the pauses cost the driver (seconds, audio seconds it read)
        "split": totals.split,
        **totals.stage_breakdown(),
    }


def worst_int8_check(worker_info: dict) -> dict | None:
    """The int8 self-check of the worst worker (lowest logit cosine), how many workers checked, and how
    many fell back (to 7-bit activations, or to the fp32 model); None for fp32 runs."""
    checks = {w: i["int8_check"] for w, i in worker_info.items() if i.get("int8_check")}
    if not checks:
        return None
    worker = min(checks, key=lambda w: checks[w]["logit_cosine"])
    fallbacks: dict[str, int] = {}
    for check in checks.values():
        if check.get("fallback"):
            fallbacks[check["fallback"]] = fallbacks.get(check["fallback"], 0) + 1
    worst = {k: v for k, v in checks[worker].items() if k != "attempts"}
    return {"worker": worker, **worst, "workers": len(checks), "fallbacks": fallbacks}


def _scored_pairs(table, ok: list[bool]) -> tuple[list[str], list[str]]:
    refs, hyps = [], []
    for keep, ref, hyp in zip(ok, table["reference"].to_pylist(), table["text"].to_pylist()):
        if keep and ref is not None:
            refs.append(normalize_text(ref))
            hyps.append(normalize_text(hyp or ""))
    return refs, hyps


def _engine(spec: JobSpec) -> str:
    return "fp32" if spec.precision == "fp32" else spec.quantization.engine
