"""Orchestration: a validated job -> Ray worker actors -> Parquet parts, stats, `_SUCCESS`.

Ray itself stays at the edge, in `runner.job.ray_pool`. Order of work, so bad input costs nothing:
1. validate the manifest (every line, unique ids) and plan shards, or, for --resume and
   --retry-errors, take the plan `job.json` recorded;                    -> exit 2 on errors
2. lock the output directory (one driver at a time) and check it (fingerprint for --resume);
                                                                         -> exit 2 on mismatch
3. load the model on the driver (NeMo only here); for int8, make (or take from the cache) the
   calibrated, accuracy-gated artifact (`runner.int8.pipeline`) -> exit 1 if the gate fails, and
   keep it in the output directory: a resume uses that same int8 model or refuses;
   `ray.put` the payload once;
4. one actor per worker (`num_cpus=threads_per_worker`), a bounded number of shards in
   flight per actor, each result written as an atomic Parquet part by the driver;
5. past the error budget, counted over the whole job: stop cleanly (exit 1), without
   `_SUCCESS`; finished parts are kept;
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

from runner.errors import InputError, RunnerError
from runner.inputs.manifest import ManifestItem, check_unique_ids, file_sha256, iter_manifest
from runner.job.run_folder import (
    ARTIFACT_FILE, JOB_FILE, LOCK_FILE, QUANTIZATION_FILE, STATS_FILE, SUCCESS_FILE, driver_lock,
    existing_parts, part_is_valid, part_path, read_part, remove_stale_temporaries, write_atomic,
    write_json, write_part
)
from runner.job.shards import Shard, group_items, plan_shards
from runner.job.spec import JobSpec

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


def prepare(spec: JobSpec, recorded: Optional[dict] = None) -> Plan:
    """Validate every manifest line and plan shards; raises `ManifestError` (exit 2) first.

    `recorded` (a resumed job's `job.json`): its plan is reused when the manifest is the one it was
    made from, so the plan never moves because a file became readable (an unreadable file weighs
    0 s when the plan is made; once repaired it would weigh its length and move every boundary
    after it). Audio headers are then not read at all.
    """
    sha = file_sha256(spec.manifest)
    shards = _recorded_shards(recorded, sha)
    counts = {"items": 0, "seconds": 0.0, "with_text": 0}

    def counted():
        items = iter_manifest(spec.manifest, read_missing_durations=shards is None)
        for item in check_unique_ids(items, spec.manifest):
            counts["items"] += 1
            counts["seconds"] += item.duration or 0.0
            counts["with_text"] += item.text is not None
            yield item

    if shards is None:
        shards = plan_shards(counted(), spec.shard_seconds)
    else:
        for _ in counted():
            pass
        counts["seconds"] = sum(s.seconds for s in shards)
    if not shards:
        raise InputError(f"{spec.manifest}: the manifest has no items")
    return Plan(shards, counts["items"], counts["seconds"], counts["with_text"], sha)


def _recorded_shards(recorded: Optional[dict], manifest_sha256: str) -> Optional[list[Shard]]:
    """The shards `job.json` planned, if it was planned from this very manifest (else the
    fingerprint check refuses the resume, naming what changed)."""
    try:
        if recorded is None or recorded["fingerprint"]["manifest_sha256"] != manifest_sha256:
            return None
        return [Shard.from_list(row) for row in recorded["plan"]]
    except (KeyError, TypeError, ValueError, IndexError):
        return None


def recorded_job(spec: JobSpec) -> Optional[dict]:
    """The output directory's `job.json`, or None when there is none (or it is unreadable:
    `check_output` says so)."""
    try:
        data = json.loads((Path(spec.output) / JOB_FILE).read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def fingerprint(spec: JobSpec, plan: Plan) -> dict:
    """What a resumed run must share with the original for its parts to be reusable."""
    shard_rows = json.dumps([s.to_list()[:4] for s in plan.shards]).encode()
    import torch

    from runner import __version__

    return {
        "manifest_sha256": plan.manifest_sha256,
        "model_sha256": file_sha256(spec.model),
        "precision": spec.precision,
        # int8 parts must come from the same quantization settings and engine policy (`auto` lets
        # each worker pick its own; the engine each part ran on is recorded in the part); the int8
        # model itself is pinned by `int8_artifact_sha256` and the copy in the output directory.
        "quantization": _quantization_fingerprint(spec),
        "torch": str(torch.__version__),  # kernels (int8 ones above all) change with torch
        "asr_runner": __version__,
        "shard_seconds": spec.shard_seconds,
        "items": plan.items,
        "plan_sha256": hashlib.sha256(shard_rows).hexdigest(),
    }


def _quantization_fingerprint(spec: JobSpec) -> Optional[dict]:
    if spec.precision != "int8":
        return None
    q = spec.quantization.__dict__.copy()
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
                             f"({_why(diff, old, fp)}); use a new --out for a new job")
    elif out.exists() and not out.is_dir():
        raise InputError(f"{out} is a file, not a directory; choose another --out")
    elif out.exists() and any(p.name != LOCK_FILE for p in out.iterdir()):
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


def _why(keys: list[str], old: dict, new: dict) -> str:
    reasons = {"manifest_sha256": "the manifest changed", "model_sha256": "the model file changed",
               "precision": "precision changed", "shard_seconds": "shard_seconds changed",
               "quantization": "the int8 quantization settings or engine policy changed",
               "torch": f"torch {old.get('torch') or '(not recorded)'} wrote it, this is torch {new.get('torch')}",
               "asr_runner": f"asr-runner {old.get('asr_runner') or '(older)'} wrote it, "
                             f"this is {new.get('asr_runner')}",
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
    from runner.model.nemo_loader import load_any  # reads .nemo archives itself: no NeMo import

    model = load_any(spec.model)
    return {"precision": "fp32", "spec": model.spec.to_dict(), "state_dict": model.state_dict()}


def quantization_settings(spec: JobSpec):
    from runner.int8.pipeline import Settings

    q = spec.quantization
    return Settings(calibration_items=q.calibration_items, gate_items=q.gate_items,
                    max_wer_increase=q.max_wer_increase, max_fp32_layers=q.max_fp32_layers, engine=q.engine)


def int8_payload(spec: JobSpec, on_event: Event, pinned: Optional[str] = None) -> tuple[dict, dict]:
    """int8: the calibrated, gated artifact (made once, then from the cache); raises GateFailed (exit 1).

    `pinned`: the sha256 of the artifact a resumed job's parts were made with; that artifact is
    taken from the output directory (never re-made, never from the cache) or the resume is refused.
    """
    from runner.int8 import artifact
    from runner.int8.pipeline import fp32_checkpoint, make_artifact

    t0 = time.perf_counter()
    if pinned:
        data, source = _job_artifact(Path(spec.output), pinned), "job"
    else:
        on_event("quantizing", model=spec.model)
        data, cached = make_artifact(spec.model, spec.manifest, spec.quantization.calibration_manifest,
                                     quantization_settings(spec))
        source = "cache" if cached else "made"
    report = artifact.Artifact.from_bytes(data).report
    info = {"sha256": artifact.sha256(data), "from_cache": source != "made", "source": source,
            "seconds": round(time.perf_counter() - t0, 2),
            "fp32_units": report.get("fp32_units", []), "gate": report.get("gate", {})}
    on_event("quantized", **info)
    q = spec.quantization
    payload = {"precision": "int8", "artifact": data, "engine": q.engine, "on_check_failure": q.on_check_failure}
    if q.on_check_failure == "fp32":  # fetched by a worker only if its int8 fails the self-check
        payload.update(fp32_checkpoint=fp32_checkpoint(spec.model), deferred=("fp32_checkpoint",))
    return payload, {"report": report, **info}


def _job_artifact(out: Path, sha256: str) -> bytes:
    """The int8 artifact a job's parts were made with, from its output directory, checked by hash."""
    from runner.int8 import artifact

    path = out / ARTIFACT_FILE
    try:
        data = path.read_bytes()
    except OSError:
        data = None
    if data is None or artifact.sha256(data) != sha256:
        what = "is missing" if data is None else "has changed"
        raise InputError(f"cannot resume {out}: its int8 model {path} {what} "
                         f"(the job's parts were made with the artifact sha256 {sha256[:16]}..., and a resume must "
                         "use that same model, not a new quantization): put the file back, or start a new job with "
                         "another --out")
    return data


def run_job(spec: JobSpec, resume: bool = False, retry_errors: bool = False, address: Optional[str] = None,
            on_event: Event = lambda kind, **data: None, started: Optional[float] = None) -> RunResult:
    """Run (or resume) a job to completion; raises `InputError` (exit 2) or `JobFailed` (exit 1).

    `started`: when the user's command started (epoch seconds; the CLI passes its process's start),
    for `total_seconds`; by default, now.
    """
    started = time.time() if started is None else started
    t_start = time.perf_counter()
    from runner.model.nemo_loader import check_model_file

    check_model_file(spec.model)
    resuming = resume or retry_errors
    recorded = recorded_job(spec) if resuming else None
    plan = prepare(spec, recorded)
    fp = fingerprint(spec, plan)
    check_output(spec, fp, resuming)  # before the lock: never a lock file in a folder that is not ours
    with driver_lock(Path(spec.output)):
        check_output(spec, fp, resuming)
        return _run_locked(spec, plan, fp, resuming, retry_errors, recorded, address, on_event, t_start, started)


def _run_locked(spec, plan, fp, resuming, retry_errors, recorded, address, on_event, t_start, started) -> RunResult:
    out = Path(spec.output)
    todo, retry = shards_to_run(spec, plan, retry_errors)
    _check_budget(spec, plan, _failed_in_finished_parts(out, plan, set(todo)))  # nothing to run can fix it
    payload, quant = None, None
    if todo:
        if spec.precision == "int8":
            # parts on disk were made with the recorded artifact: a resume must use it (none yet: the driver
            # stopped between job.json and the artifact's copy, and a new quantization mixes nothing)
            pinned = (recorded or {}).get("int8_artifact_sha256") if existing_parts(out) else None
            payload, quant = int8_payload(spec, on_event, pinned)
        else:
            payload = load_payload(spec)
    claim_output(spec, plan, fp, resuming, {"int8_artifact_sha256": quant["sha256"]} if quant else None)
    if quant:
        if quant["source"] != "job":
            write_atomic(out / ARTIFACT_FILE, payload["artifact"])
        write_json(out / QUANTIZATION_FILE, quant["report"])
    todo_seconds = sum(plan.shards[i].seconds for i in todo)
    on_event("planned", shards=len(plan.shards), todo=len(todo), items=plan.items, seconds=plan.seconds,
             todo_seconds=todo_seconds)
    processed = {"audio": 0.0, "wall": 0.0, "startup": 0.0, "workers": 0, "engines": {}, "started": started,
                 "quantize": quant["seconds"] if quant and quant["source"] == "made" else 0.0,
                 "quantization": {k: v for k, v in (quant or {}).items() if k != "report"} or None}
    if todo:
        _run_on_ray(spec, plan, todo, retry, payload, address, on_event, processed, t_start)
    _check_budget(spec, plan, _failed_in_finished_parts(out, plan, set()))  # the whole job, whatever ran now
    stats = finish(spec, plan, processed)
    on_event("finished", stats=stats)
    return RunResult(out, stats, todo)


def _check_budget(spec: JobSpec, plan: Plan, failed: int) -> None:
    """Raise `JobFailed` (exit 1, no `_SUCCESS`) when the job holds more error rows than its budget."""
    budget = spec.max_failed_items(plan.items)
    if failed > budget:
        (Path(spec.output) / SUCCESS_FILE).unlink(missing_ok=True)  # from an earlier run under a larger budget
        raise JobFailed(f"{failed} failed items exceed the error budget max_failed={spec.max_failed} "
                        f"({budget} of {plan.items} items); finished parts are kept: fix the inputs (see the `error` "
                        "column), then run again with --retry-errors (it re-runs the error rows; --resume does not), "
                        "or raise max_failed in the spec and run again with --resume")


def _run_on_ray(spec, plan, todo, retry, payload, address, on_event, processed, t_start) -> None:
    from runner.job import ray_pool

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
        _check_budget(spec, plan, failed)


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
            failed += sum(s == "error" for s in read_part(path, ["status"])["status"].to_pylist())
    return failed


def finish(spec: JobSpec, plan: Plan, processed: dict) -> dict:
    from runner.job.stats import job_stats

    out = Path(spec.output)
    stats = job_stats(spec, out, processed)
    if processed.get("started") is not None:  # the user's clock: command start to `_SUCCESS` (an fsync away)
        total = time.time() - processed["started"]
        stats.update(total_seconds=round(total, 3),
                     rtfx_total=round(processed.get("audio", 0.0) / total, 2) if total > 0 else None)
    write_json(out / STATS_FILE, stats)
    write_atomic(out / SUCCESS_FILE, b"")
    return stats

