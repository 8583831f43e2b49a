"""Run figures from the Parquet parts: counts, audio seconds, RTFx, WER/CER, the CPU."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

from runner.metrics import cer, normalize_text, wer
from runner.job.run_folder import read_rows
from runner.job.spec import JobSpec
from runner.sysinfo import cpu_info


def job_stats(spec: JobSpec, out: Path, processed: dict) -> dict:
    """`stats.json` content. `audio_seconds` covers the whole job; `rtfx` the audio this invocation
    transcribed (`processed_audio_seconds`) over its dispatch `wall_seconds` (equal for a fresh run);
    `rtfx_total` the same audio over `total_seconds`, what the user waited."""
    table = read_rows(out, ["status", "duration", "text", "reference"])
    status = table["status"].to_pylist()
    ok = [s == "ok" for s in status]
    durations = table["duration"].to_pylist()
    refs, hyps = _scored_pairs(table, ok)
    wall = processed.get("wall", 0.0)
    engines = sorted(set(processed.get("engines", {}).values())) or [_engine(spec)]
    return {
        "precision": spec.precision,
        "engine": engines[0] if len(engines) == 1 else "mixed",
        "engines": processed.get("engines", {}),
        "workers": processed.get("workers") or spec.workers,
        "threads_per_worker": spec.threads_per_worker,
        "utterances": len(status),
        "failed": len(status) - sum(ok),
        "audio_seconds": round(sum(d or 0.0 for d, k in zip(durations, ok) if k), 3),
        "processed_audio_seconds": round(processed.get("audio", 0.0), 3),
        # the user's clock (command start to `_SUCCESS`), set by `jobs.finish`; the dispatch figures follow
        "total_seconds": None,
        "rtfx_total": None,
        "quantize_seconds": round(processed.get("quantize", 0.0), 3),  # int8 made now; 0 when cached or fp32
        "startup_seconds": round(processed.get("startup", 0.0), 3),
        "wall_seconds": round(wall, 3),
        "rtfx": round(processed.get("audio", 0.0) / wall, 2) if wall > 0 else None,
        "wer": round(wer(refs, hyps), 5) if refs else None,
        "cer": round(cer(refs, hyps), 5) if refs else None,
        "scored_utterances": len(refs),
        "cpu": cpu_info(),
        "worker_heavy_imports": processed.get("worker_heavy_imports", []),
        # per worker: engine, auto timings, int8 self-check, load seconds, CPU, peak RSS
        "worker_info": processed.get("worker_info", {}),
        "int8_check": worst_int8_check(processed.get("worker_info", {})),
        "quantization": processed.get("quantization"),  # int8: artifact sha256, cache, fp32 units, gate
        **stage_breakdown(processed),
    }


def worst_int8_check(worker_info: dict) -> Optional[dict]:
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


def stage_breakdown(processed: dict) -> dict:
    """Where this invocation's time went: `stages` (seconds) and `stage_fractions` (of their sum).

    The worker-seconds available are workers x wall_seconds. Workers report seconds per stage
    (read, resample, features, encoder, decode) inside each shard's compute seconds; `other` is
    the rest of that compute (row bookkeeping). `ray_overhead` is what the workers did not spend
    computing: worker-seconds available minus the summed compute seconds (dispatch, result
    transfer, idle workers waiting for a shard or at the tail of the job). `write` is the driver's
    Parquet writing, which overlaps the workers' time; fractions are of the sum of all stages.
    """
    measured, compute = processed.get("stages", {}), processed.get("compute", 0.0)
    if not measured:
        return {"stages": {}, "stage_fractions": {}}
    available = (processed.get("workers") or 0) * processed.get("wall", 0.0)
    worker = {k: v for k, v in measured.items() if k != "write"}
    stages = {**worker, "other": max(0.0, compute - sum(worker.values())), "write": measured.get("write", 0.0),
              "ray_overhead": max(0.0, available - compute)}
    total = sum(stages.values()) or 1.0
    return {"stages": {k: round(v, 3) for k, v in stages.items()},
            "stage_fractions": {k: round(v / total, 4) for k, v in stages.items()}}


def _scored_pairs(table, ok: list[bool]) -> tuple[list[str], list[str]]:
    refs, hyps = [], []
    for keep, ref, hyp in zip(ok, table["reference"].to_pylist(), table["text"].to_pylist()):
        if keep and ref is not None:
            refs.append(normalize_text(ref))
            hyps.append(normalize_text(hyp or ""))
    return refs, hyps


def _engine(spec: JobSpec) -> str:
    return "fp32" if spec.precision == "fp32" else spec.quantization.engine
