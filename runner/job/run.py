"""Orchestration: a validated job -> Ray worker actors -> Parquet parts, stats, `_SUCCESS`.

Ray itself stays at the edge, in the generic `runner.job.ray_pool`; `runner.job.shard_pool` puts the
job's workers on it. Order of work, so bad input costs nothing:
1. validate the manifest (every line, unique ids) and plan shards, or, for --resume and
   --retry-errors, take the plan `job.json` recorded;                    -> exit 2 on errors
2. lock the output directory (one driver at a time) and check it (fingerprint for --resume);
                                                                         -> exit 2 on mismatch
3. load the model on the driver (NeMo only here); for int8, make (or take from the cache) the
   calibrated, accuracy-gated artifact (`runner.int8.pipeline`) -> exit 1 if the gate fails, and
   keep it in the output directory: a resume uses that same int8 model or refuses
   (`runner.job.payload`); the `WorkerPayload` is `ray.put` once;
4. one actor per worker (`num_cpus=threads_per_worker`), a bounded number of shards in
   flight per actor, each result written as an atomic Parquet part by the driver;
5. a long line's segments (shards of their own) are kept in `segments/` as they return, and joined into
   the line's one row once all are in (`runner.job.segments`);
6. past the error budget, counted over the whole job: send no more shards, write the parts of
   those already sent (their compute is spent), then stop cleanly (exit 1) without `_SUCCESS`;
7. all shards done: `stats.json`, then `_SUCCESS`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from runner.errors import InputError, RunnerError
from runner.inputs.manifest import ManifestItem, file_sha256, iter_manifest
from runner.job.events import EventHandler, EventKind
from runner.job.payload import worker_payload
from runner.job.run_folder import (
    ARTIFACT_FILE,
    JOB_FILE,
    LOCK_FILE,
    QUANTIZATION_FILE,
    STATS_FILE,
    SUCCESS_FILE,
    driver_lock,
    existing_parts,
    part_is_valid,
    part_path,
    read_part,
    remove_stale_temporaries,
    write_atomic,
    write_json,
    write_part,
)
from runner.job.segments import (
    SplitLines,
    line_norms,
    model_spec,
    remove_segment_temporaries,
    rewritten_parts,
    segments_to_run,
)
from runner.job.shards import Plan, expected_workers, group_items, prepare
from runner.job.spec import JobSpec
from runner.job.stats import RunTotals, job_stats

if TYPE_CHECKING:
    from runner.job.shard_pool import ShardPool

log = logging.getLogger(__name__)


class JobFailed(RunnerError):
    """The job stopped (error budget exceeded, workers lost); finished parts remain valid."""


@dataclass
class RunResult:
    out: Path
    stats: dict
    ran_shards: list[int] = field(default_factory=list)


def recorded_job(spec: JobSpec) -> dict | None:
    """The output directory's `job.json`, or None when there is none (or it is unreadable:
    `check_output` says so)."""
    try:
        data = json.loads((Path(spec.output) / JOB_FILE).read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def fingerprint(spec: JobSpec, plan: Plan) -> dict:
    """What a resumed run must share with the original for its parts to be reusable."""
    shard_rows = json.dumps([s.to_list()[:4] + s.to_list()[5:] for s in plan.shards]).encode()  # spans too
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
        "split": [spec.split_seconds, spec.segment_seconds],  # which lines were split, and how finely
        "words": dataclasses.asdict(spec.confidence) if spec.timestamps else None,  # what the `words` column holds
        **({"decoder": spec.decoder} if spec.decoder else {}),  # a hybrid model's head
        "items": plan.items,
        "plan_sha256": hashlib.sha256(shard_rows).hexdigest(),
    }


def _quantization_fingerprint(spec: JobSpec) -> dict | None:
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
            raise InputError(
                f"{out} already holds a job ({JOB_FILE}); pass --resume to continue it "
                "(or --retry-errors), or choose another --out"
            )
        try:
            old = json.loads(job_file.read_text())["fingerprint"]
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise InputError(
                f"cannot resume {out}: its {JOB_FILE} is unreadable ({type(exc).__name__}); it was not "
                "written by asr-runner or was damaged: use a new --out"
            ) from None
        diff = [k for k in fp if old.get(k) != fp[k]]
        if diff:
            raise InputError(
                f"cannot resume {out}: {', '.join(diff)} differ from the job that wrote it "
                f"({_why(diff, old, fp)}); use a new --out for a new job"
            )
    elif out.exists() and not out.is_dir():
        raise InputError(f"{out} is a file, not a directory; choose another --out")
    elif out.exists() and any(p.name != LOCK_FILE for p in out.iterdir()):
        raise InputError(f"{out} is not empty and holds no {JOB_FILE}; choose a new or empty output directory")


def claim_output(spec: JobSpec, plan: Plan, fp: dict, resume: bool, extra: dict | None = None) -> None:
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
    remove_segment_temporaries(out)
    write_json(
        job_file,
        {
            "spec": spec.to_dict(),
            "fingerprint": fp,
            "plan": [s.to_list() for s in plan.shards],
            "plan_columns": ["shard", "first_line", "last_line", "items", "seconds"]
            + ["segment_start", "segment_end", "cut", "segment", "segments"],  # segments of a split line only
            **(extra or {}),
        },
    )


def _why(keys: list[str], old: dict, new: dict) -> str:
    reasons = {
        "manifest_sha256": "the manifest changed",
        "model_sha256": "the model file changed",
        "precision": "precision changed",
        "shard_seconds": "shard_seconds changed",
        "split": "split_seconds or segment_seconds changed",
        "quantization": "the int8 quantization settings or engine policy changed",
        "torch": f"torch {old.get('torch') or '(not recorded)'} wrote it, this is torch {new.get('torch')}",
        "asr_runner": f"asr-runner {old.get('asr_runner') or '(older)'} wrote it, this is {new.get('asr_runner')}",
        "items": "the manifest has a different number of items",
        "plan_sha256": "the shard plan changed",
    }
    return "; ".join(reasons.get(k, k) for k in keys)


def shards_to_run(spec: JobSpec, plan: Plan, retry_errors: bool) -> tuple[list[int], dict[int, set[str]]]:
    """Shards without a valid part; with `retry_errors`, also those holding error rows (and which ids)."""
    out = Path(spec.output)
    parts = existing_parts(out)  # files past the plan (part-99999...) are not ours: left alone, never read
    todo, retry = [], {}
    for shard in plan.shards:
        if shard.segment is not None:
            continue  # below, line by line
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
    return sorted(todo + segments_to_run(out, plan, parts, retry_errors)), retry


def run_job(
    spec: JobSpec,
    resume: bool = False,
    retry_errors: bool = False,
    address: str | None = None,
    on_event: EventHandler = lambda kind, **data: None,
    started: float | None = None,
) -> RunResult:
    """Run (or resume) a job to completion; raises `InputError` (exit 2) or `JobFailed` (exit 1).

    `started`: when the user's command started (epoch seconds; the CLI passes its process's start),
    for `total_seconds`; by default, now.
    """
    started = time.time() if started is None else started
    t_start = time.perf_counter()
    from runner.model.nemo_loader import check_model_file
    from runner.model.nemo_transducer import is_transducer

    if is_transducer(check_model_file(spec.model) or "") and spec.split_seconds:
        log.info("a transducer's long recordings are transcribed whole, in windows (split_seconds applies to CTC)")
        spec = dataclasses.replace(spec, split_seconds=0)
    resuming = resume or retry_errors
    recorded = recorded_job(spec) if resuming else None
    plan = prepare(spec, recorded, expected_workers(spec, address))
    fp = fingerprint(spec, plan)
    check_output(spec, fp, resuming)  # before the lock: never a lock file in a folder that is not ours
    with driver_lock(Path(spec.output)):
        check_output(spec, fp, resuming)
        return _run_locked(spec, plan, fp, resuming, retry_errors, recorded, address, on_event, t_start, started)


def _run_locked(spec, plan, fp, resuming, retry_errors, recorded, address, on_event, t_start, started) -> RunResult:
    out = Path(spec.output)
    todo, retry = shards_to_run(spec, plan, retry_errors)
    # over the budget already, with what stays as it is: nothing run now can fix it
    _check_budget(spec, plan, _failed_in_finished_parts(out, plan, rewritten_parts(plan, todo)))
    payload, quant = worker_payload(spec, recorded, on_event) if todo else (None, None)
    claim_output(spec, plan, fp, resuming, {"int8_artifact_sha256": quant["sha256"]} if quant else None)
    if quant:
        if quant["source"] != "job":
            write_atomic(out / ARTIFACT_FILE, payload.artifact)
        write_json(out / QUANTIZATION_FILE, quant["report"].to_dict())
    todo_seconds = sum(plan.shards[i].seconds for i in todo)
    on_event(
        EventKind.PLANNED,
        shards=len(plan.shards),
        todo=len(todo),
        items=plan.items,
        seconds=plan.seconds,
        todo_seconds=todo_seconds,
        split=plan.split.to_dict() if plan.split.lines else None,
    )
    made_now = quant is not None and quant["source"] == "made"
    totals = RunTotals(
        started=started,
        quantize_seconds=quant["seconds"] if made_now else 0.0,
        quantization={k: v for k, v in (quant or {}).items() if k != "report"} or None,
        split=plan.split.to_dict() if plan.split_lines else None,
    )
    if plan.split.seconds:  # finding the pauses, on the driver, when the job was planned now
        totals.stages["split"] = plan.split.seconds
    if todo:
        _run_on_ray(spec, plan, todo, retry, payload, address, on_event, totals, t_start)
    _check_budget(spec, plan, _failed_in_finished_parts(out, plan, set()))  # the whole job, whatever ran now
    stats = finish(spec, plan, totals)
    on_event(EventKind.FINISHED, stats=stats)
    return RunResult(out, stats, todo)


def _check_budget(spec: JobSpec, plan: Plan, failed: int) -> None:
    """Raise `JobFailed` (exit 1, no `_SUCCESS`) when the job holds more error rows than its budget."""
    budget = spec.max_failed_items(plan.items)
    if failed > budget:
        (Path(spec.output) / SUCCESS_FILE).unlink(missing_ok=True)  # from an earlier run under a larger budget
        raise JobFailed(
            f"{failed} failed items exceed the error budget max_failed={spec.max_failed} "
            f"({budget} of {plan.items} items); finished parts are kept: fix the inputs (see the `error` "
            "column), then run again with --retry-errors (it re-runs the error rows; --resume does not), "
            "or raise max_failed in the spec and run again with --resume"
        )


def _run_on_ray(spec, plan, todo, retry, payload, address, on_event, totals: RunTotals, t_start) -> None:
    from runner.job.shard_pool import ShardPool

    with ShardPool(spec, payload, address) as pool:
        totals.startup_seconds = time.perf_counter() - t_start
        totals.workers = pool.count
        totals.engines, totals.worker_info = pool.engines, pool.infos  # the pool's own dicts: replacements too
        on_event(EventKind.WORKERS, names=pool.names, engines=pool.engines, startup=totals.startup_seconds)
        t0 = time.perf_counter()
        # split lines: the workers sum each line's log-mel statistics first, so its segments are the whole line
        model = model_spec(payload) if any(plan.shards[i].segment is not None for i in todo) else None
        norms = line_norms(pool, plan, todo, spec, model, totals) if model is not None else {}
        _dispatch(spec, plan, todo, retry, pool, model, norms, on_event, totals)
        totals.wall_seconds = time.perf_counter() - t0
        totals.worker_heavy_imports = pool.heavy_imports  # replacements included


def _dispatch(spec, plan, todo, retry, pool: ShardPool, model, norms, on_event, totals: RunTotals) -> None:
    """Send the shards to the pool and write each part as it returns. Once the error budget is broken,
    no more shards are sent; those already sent are finished and written, then `JobFailed` is raised."""
    out = Path(spec.output)
    budget = spec.max_failed_items(plan.items)
    failed = _failed_in_finished_parts(out, plan, rewritten_parts(plan, todo))
    items = iter_manifest(spec.manifest, read_missing_durations=False)
    lines = SplitLines(out, plan, todo, model, spec.confidence if spec.timestamps else None)

    def work():
        for shard, batch in group_items(items, plan.shards, set(todo)):
            if failed > budget:  # read as each shard is about to be sent
                return
            if shard.segment is not None:  # with its line's log-mel statistics
                batch = [dataclasses.replace(batch[0], norm=norms.get(shard.first_segment))]
            yield shard, _only(batch, retry.get(shard.index))

    for shard, rows, result in pool.map(work()):
        if shard.index in retry:
            rows = _merge(read_part(part_path(out, shard.index)).to_pylist(), rows)
        t0 = time.perf_counter()
        meta = {
            "worker": result.worker,
            "engine": result.engine,
            "compute_seconds": result.compute_seconds,
            "stages": result.stages,
        }
        if shard.segment is None:
            write_part(out, shard.index, rows, meta)
        else:
            rows = lines.add(shard, rows[0], meta)  # the line's row once its last segment is in; else none
        totals.add_shard(result, time.perf_counter() - t0)
        was_within = failed <= budget
        failed += sum(r["status"] == "error" for r in rows)
        on_event(
            EventKind.SHARD,
            shard=shard.index,
            audio_seconds=result.audio_seconds,
            worker=result.worker,
            failed=failed,
            errors=[r["error"] for r in rows if r["status"] == "error"][:3],
        )
        if was_within and failed > budget:
            log.warning(
                "%d failed items exceed the error budget (%d): no more shards are sent; "
                "finishing the ones already running",
                failed,
                budget,
            )
    _check_budget(spec, plan, failed)


def _only(batch: list[ManifestItem], ids: set[str] | None) -> list[ManifestItem]:
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


def finish(spec: JobSpec, plan: Plan, totals: RunTotals) -> dict:
    out = Path(spec.output)
    stats = job_stats(spec, out, totals)
    stats.update(totals.user_clock())  # the user's clock: command start to `_SUCCESS` (an fsync away)
    write_json(out / STATS_FILE, stats)
    write_atomic(out / SUCCESS_FILE, b"")
    return stats
