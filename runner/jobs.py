"""Orchestration: a validated job -> Ray worker actors -> Parquet parts, stats, `_SUCCESS`.

Ray itself stays at the edge, in `runner.ray_pool`. Order of work, so bad input costs nothing:
1. validate the manifest (every line, unique ids) and plan shards;     -> exit 2 on errors
2. claim the output directory (fingerprint check for --resume);        -> exit 2 on mismatch
3. load the model on the driver (NeMo only here); for int8, make (or take from the cache) the
   calibrated, accuracy-gated artifact (`runner.calibrate`) -> exit 1 if the gate fails;
   `ray.put` the payload once;
4. one actor per worker (`num_cpus=threads_per_worker`), a bounded number of shards in
   flight per actor, each result written as an atomic Parquet part by the driver;
5. past the error budget: stop cleanly (exit 1), finished parts stay valid for --resume;
6. all shards done: `stats.json`, then `_SUCCESS`.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

from .errors import InputError, RunnerError
from .manifest import ManifestItem, check_unique_ids, file_sha256, iter_manifest
from .output import (JOB_FILE, QUANTIZATION_FILE, STATS_FILE, SUCCESS_FILE, existing_parts, part_is_valid, part_path, read_part,
                     remove_stale_temporaries, write_atomic, write_json, write_part)
from .shards import Shard, group_items, plan_shards
from .spec import JobSpec

log = logging.getLogger(__name__)

Event = Callable[..., None]


class JobFailed(RunnerError):
    """The job stopped (error budget exceeded, workers lost); finished parts remain valid."""


@dataclass
class Plan:
    shards: list[Shard]
    items: int
    seconds: float
    with_text: int
    manifest_sha256: str


@dataclass
class RunResult:
    out: Path
    stats: dict
    ran_shards: list[int] = field(default_factory=list)


def prepare(spec: JobSpec) -> Plan:
    """Validate every manifest line and plan shards; raises `ManifestError` (exit 2) first."""
    counts = {"items": 0, "seconds": 0.0, "with_text": 0}

    def counted():
        for item in check_unique_ids(iter_manifest(spec.manifest), spec.manifest):
            counts["items"] += 1
            counts["seconds"] += item.duration or 0.0
            counts["with_text"] += item.text is not None
            yield item

    shards = plan_shards(counted(), spec.shard_seconds)
    if not shards:
        raise InputError(f"{spec.manifest}: the manifest has no items")
    return Plan(shards, counts["items"], counts["seconds"], counts["with_text"], file_sha256(spec.manifest))


def fingerprint(spec: JobSpec, plan: Plan) -> dict:
    """What a resumed run must share with the original for its parts to be reusable."""
    shard_rows = json.dumps([s.to_list()[:4] for s in plan.shards]).encode()
    return {
        "manifest_sha256": plan.manifest_sha256,
        "model_sha256": file_sha256(spec.model),
        "precision": spec.precision,
        # int8 parts must come from the same quantization settings (the engine may differ: the
        # artifact is engine-neutral and each worker picks its own).
        "quantization": _quantization_fingerprint(spec),
        "shard_seconds": spec.shard_seconds,
        "items": plan.items,
        "plan_sha256": hashlib.sha256(shard_rows).hexdigest(),
    }


def _quantization_fingerprint(spec: JobSpec) -> Optional[dict]:
    if spec.precision != "int8":
        return None
    q = spec.quantization.__dict__.copy()
    q.pop("engine")
    q.pop("on_check_failure")  # what a worker does when its self-check fails: recorded per part, not per job
    if q["calibration_manifest"]:
        q["calibration_manifest"] = file_sha256(q["calibration_manifest"])
    return q


def check_output(spec: JobSpec, fp: dict, resume: bool) -> None:
    """Refuse (exit 2) to mix two jobs in one folder; writes nothing."""
    out = Path(spec.output)
    job_file = out / JOB_FILE
    if job_file.exists():
        if not resume:
            raise InputError(f"{out} already holds a job ({JOB_FILE}); pass --resume to continue it "
                             "(or --retry-errors), or choose another --out")
        try:
            old = json.loads(job_file.read_text())["fingerprint"]
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise InputError(f"cannot resume {out}: its {JOB_FILE} is unreadable ({type(exc).__name__}); it was not "
                             "written by asr-runner or was damaged: use a new --out") from None
        diff = [k for k in fp if old.get(k) != fp[k]]
        if diff:
            raise InputError(f"cannot resume {out}: {', '.join(diff)} differ from the job that wrote it "
                             f"({_why(diff)}); use a new --out for a new job")
    elif out.exists() and not out.is_dir():
        raise InputError(f"{out} is a file, not a directory; choose another --out")
    elif out.exists() and any(out.iterdir()):
        raise InputError(f"{out} is not empty and holds no {JOB_FILE}; choose a new or empty output directory")


def claim_output(spec: JobSpec, plan: Plan, fp: dict, resume: bool, extra: Optional[dict] = None) -> None:
    """Create or re-open the run directory (after `check_output`) and write `job.json`."""
    check_output(spec, fp, resume)
    out = Path(spec.output)
    job_file = out / JOB_FILE
    if job_file.exists() and not extra:  # a resume with nothing to run keeps what the job recorded
        old = json.loads(job_file.read_text())
        extra = {k: old[k] for k in ("int8_artifact_sha256",) if k in old}
    out.mkdir(parents=True, exist_ok=True)
    (out / SUCCESS_FILE).unlink(missing_ok=True)
    remove_stale_temporaries(out)
    write_json(job_file, {"spec": spec.to_dict(), "fingerprint": fp,
                          "plan": [s.to_list() for s in plan.shards],
                          "plan_columns": ["shard", "first_line", "last_line", "items", "seconds"], **(extra or {})})


def _why(keys: list[str]) -> str:
    reasons = {"manifest_sha256": "the manifest changed", "model_sha256": "the model file changed",
               "precision": "precision changed", "shard_seconds": "shard_seconds changed",
               "quantization": "the int8 quantization settings changed",
               "items": "the manifest has a different number of items", "plan_sha256": "the shard plan changed"}
    return "; ".join(reasons.get(k, k) for k in keys)


def shards_to_run(spec: JobSpec, plan: Plan, retry_errors: bool) -> tuple[list[int], dict[int, set[str]]]:
    """Shards without a valid part; with `retry_errors`, also those holding error rows (and which ids)."""
    out = Path(spec.output)
    parts = existing_parts(out)  # files past the plan (part-99999...) are not ours: left alone, never read
    todo, retry = [], {}
    for shard in plan.shards:
        path = parts.get(shard.index)
        if path is None or not part_is_valid(path, shard.index, shard.items):
            if path is not None:
                log.warning("part %s is damaged or incomplete; recomputing shard %d", path.name, shard.index)
            todo.append(shard.index)
        elif retry_errors:
            table = read_part(path)
            errors = {i for i, s in zip(table["id"].to_pylist(), table["status"].to_pylist()) if s == "error"}
            if errors:
                todo.append(shard.index)
                retry[shard.index] = errors
    return todo, retry


def load_payload(spec: JobSpec) -> dict:
    """fp32: what every worker needs to rebuild its model, in one picklable dict (put in Ray once)."""
    from .nemo_loader import load_any  # NeMo is imported here only for .nemo files

    model = load_any(spec.model)
    return {"precision": "fp32", "spec": model.spec.to_dict(), "state_dict": model.state_dict()}


def quantization_settings(spec: JobSpec):
    from .calibrate import Settings

    q = spec.quantization
    return Settings(calibration_items=q.calibration_items, gate_items=q.gate_items,
                    max_wer_increase=q.max_wer_increase, max_fp32_layers=q.max_fp32_layers, engine=q.engine)


def int8_payload(spec: JobSpec, on_event: Event) -> tuple[dict, dict]:
    """int8: the calibrated, gated artifact (made once, then from the cache); raises GateFailed (exit 1)."""
    from . import artifact
    from .calibrate import fp32_checkpoint, make_artifact

    on_event("quantizing", model=spec.model)
    t0 = time.perf_counter()
    data, cached = make_artifact(spec.model, spec.manifest, spec.quantization.calibration_manifest,
                                 quantization_settings(spec))
    report = artifact.Artifact.from_bytes(data).report
    info = {"sha256": artifact.sha256(data), "from_cache": cached, "seconds": round(time.perf_counter() - t0, 2),
            "fp32_units": report.get("fp32_units", []), "gate": report.get("gate", {})}
    on_event("quantized", **info)
    q = spec.quantization
    payload = {"precision": "int8", "artifact": data, "engine": q.engine, "on_check_failure": q.on_check_failure}
    if q.on_check_failure == "fp32":  # fetched by a worker only if its int8 fails the self-check
        payload.update(fp32_checkpoint=fp32_checkpoint(spec.model), deferred=("fp32_checkpoint",))
    return payload, {"report": report, **info}


def run_job(spec: JobSpec, resume: bool = False, retry_errors: bool = False, address: Optional[str] = None,
            on_event: Event = lambda kind, **data: None) -> RunResult:
    """Run (or resume) a job to completion; raises `InputError` (exit 2) or `JobFailed` (exit 1)."""
    t_start = time.perf_counter()
    from .nemo_loader import check_model_file

    check_model_file(spec.model)
    plan = prepare(spec)
    fp = fingerprint(spec, plan)
    check_output(spec, fp, resume or retry_errors)
    todo, retry = shards_to_run(spec, plan, retry_errors)
    payload, quant = None, None
    if todo:
        payload, quant = int8_payload(spec, on_event) if spec.precision == "int8" else (load_payload(spec), None)
    claim_output(spec, plan, fp, resume or retry_errors,
                 {"int8_artifact_sha256": quant["sha256"]} if quant else None)
    if quant:
        write_json(Path(spec.output) / QUANTIZATION_FILE, quant["report"])
    todo_seconds = sum(plan.shards[i].seconds for i in todo)
    on_event("planned", shards=len(plan.shards), todo=len(todo), items=plan.items, seconds=plan.seconds,
             todo_seconds=todo_seconds)
    processed = {"audio": 0.0, "wall": 0.0, "startup": 0.0, "workers": 0, "engines": {},
                 "quantization": {k: v for k, v in (quant or {}).items() if k != "report"} or None}
    if todo:
        _run_on_ray(spec, plan, todo, retry, payload, address, on_event, processed, t_start)
    stats = finish(spec, plan, processed)
    on_event("finished", stats=stats)
    return RunResult(Path(spec.output), stats, todo)


def _run_on_ray(spec, plan, todo, retry, payload, address, on_event, processed, t_start) -> None:
    from . import ray_pool

    with ray_pool.RayPool(spec, payload, address) as pool:
        processed["startup"] = time.perf_counter() - t_start
        processed["workers"] = len(pool.actors)  # replacements of dead workers do not add to it
        processed["engines"] = pool.engines
        processed["worker_info"] = pool.infos
        on_event("workers", names=pool.names, engines=pool.engines, startup=processed["startup"])
        t0 = time.perf_counter()
        _dispatch(spec, plan, todo, retry, pool, on_event, processed)
        processed["wall"] = time.perf_counter() - t0
        processed["worker_heavy_imports"] = pool.heavy_imports  # replacements included


def _dispatch(spec, plan, todo, retry, pool, on_event, processed) -> None:
    out = Path(spec.output)
    budget = spec.max_failed_items(plan.items)
    failed = _failed_in_finished_parts(out, plan, set(todo))
    items = iter_manifest(spec.manifest, read_missing_durations=False)
    work = ((shard, _only(batch, retry.get(shard.index))) for shard, batch in group_items(items, plan.shards, set(todo)))
    for shard, rows, result in pool.map(work):
        if shard.index in retry:
            rows = _merge(read_part(part_path(out, shard.index)).to_pylist(), rows)
        t0 = time.perf_counter()
        write_part(out, shard.index, rows, {"worker": result.worker, "engine": result.engine,
                                            "compute_seconds": result.compute_seconds, "stages": result.stages})
        _add_stages(processed, result, time.perf_counter() - t0)
        failed += sum(r["status"] == "error" for r in rows)
        processed["audio"] += result.audio_seconds
        info = processed["worker_info"].setdefault(result.worker, {})  # the pool's dict: replacements too
        info["peak_rss_mb"] = max(info.get("peak_rss_mb", 0.0), result.peak_rss_mb)
        on_event("shard", shard=shard.index, audio_seconds=result.audio_seconds, worker=result.worker,
                 failed=failed, errors=[r["error"] for r in rows if r["status"] == "error"][:3])
        if failed > budget:
            raise JobFailed(f"{failed} failed items exceed the error budget max_failed={spec.max_failed} "
                            f"({budget} of {plan.items} items); finished parts are kept: fix the inputs "
                            "(see the `error` column) and run again with --resume or --retry-errors")


def _add_stages(processed: dict, result, write_seconds: float) -> None:
    """Sum the worker's per-stage seconds, its compute seconds and the driver's Parquet write."""
    stages = processed.setdefault("stages", {})
    for name, seconds in {**result.stages, "write": write_seconds}.items():
        stages[name] = stages.get(name, 0.0) + seconds
    processed["compute"] = processed.get("compute", 0.0) + result.compute_seconds


def _only(batch: list[ManifestItem], ids: Optional[set[str]]) -> list[ManifestItem]:
    return batch if ids is None else [item for item in batch if item.id in ids]


def _merge(old_rows: list[dict], new_rows: list[dict]) -> list[dict]:
    by_id = {r["id"]: r for r in new_rows}
    return [by_id.get(r["id"], r) for r in old_rows]


def _failed_in_finished_parts(out: Path, plan: Plan, todo: set[int]) -> int:
    failed = 0
    for index, path in existing_parts(out).items():
        if index not in todo and index < len(plan.shards):
            failed += sum(s == "error" for s in read_part(path)["status"].to_pylist())
    return failed


def finish(spec: JobSpec, plan: Plan, processed: dict) -> dict:
    from .stats import job_stats

    out = Path(spec.output)
    stats = job_stats(spec, out, processed)
    write_json(out / STATS_FILE, stats)
    write_atomic(out / SUCCESS_FILE, b"")
    return stats

