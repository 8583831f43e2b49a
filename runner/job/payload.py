"""What the workers are sent (`WorkerPayload`, put in Ray once): the fp32 model, or the int8 artifact.

The int8 artifact is made once (calibrated and accuracy-gated by `runner.int8.pipeline`, exit 1 when the
gate fails) and then taken from the cache; a resumed job whose parts were made with an artifact uses the
copy in its output directory, checked by hash, or is refused (exit 2): parts of one job never mix two
int8 models. Driver side; the model, torch and the int8 pipeline are imported inside its functions.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import TYPE_CHECKING

from runner.errors import InputError
from runner.job.events import EventHandler, EventKind
from runner.job.run_folder import ARTIFACT_FILE, existing_parts
from runner.job.spec import JobSpec

if TYPE_CHECKING:
    from runner.job.worker import Fp32Payload, Int8Payload, WorkerPayload


def worker_payload(spec: JobSpec, recorded: dict | None, on_event: EventHandler) -> tuple[WorkerPayload, dict | None]:
    """What the workers are sent, and for int8 the artifact's record (`int8_payload`); only with shards to run."""
    if spec.precision != "int8":
        return fp32_payload(spec), None
    # parts on disk were made with the recorded artifact: a resume must use it (none yet: the driver
    # stopped between job.json and the artifact's copy, and a new quantization mixes nothing)
    pinned = (recorded or {}).get("int8_artifact_sha256") if existing_parts(Path(spec.output)) else None
    return int8_payload(spec, on_event, pinned)


def fp32_payload(spec: JobSpec) -> Fp32Payload:
    """fp32: what every worker needs to rebuild its model (put in Ray once)."""
    from runner.job.worker import Fp32Payload
    from runner.model.nemo_loader import load_any  # reads .nemo archives itself: no NeMo import

    model = load_any(spec.model, spec.decoder)
    return Fp32Payload(model.spec.to_dict(), model.state_dict())


def int8_payload(spec: JobSpec, on_event: EventHandler, pinned: str | None = None) -> tuple[Int8Payload, dict]:
    """int8: the calibrated, gated artifact (made once, then from the cache); raises GateFailed (exit 1).

    `pinned`: the sha256 of the artifact a resumed job's parts were made with; that artifact is
    taken from the output directory (never re-made, never from the cache) or the resume is refused.
    """
    from runner.int8 import artifact
    from runner.int8.cache import fp32_checkpoint
    from runner.int8.make import make_artifact
    from runner.job.ray_pool import Deferred
    from runner.job.worker import Int8Payload

    t0 = time.perf_counter()
    if pinned:
        data, source = _job_artifact(Path(spec.output), pinned), "job"
        report = artifact.Artifact.from_bytes(data).report  # the resumed job's own artifact: read its record
    else:
        on_event(EventKind.QUANTIZING, model=spec.model)
        made = make_artifact(
            spec.model,
            spec.manifest,
            spec.quantization.calibration_manifest,
            spec.quantization.settings(),
            decoder=spec.decoder,
        )
        data, report, source = made.data, made.report, "cache" if made.from_cache else "made"
    info = {
        "sha256": artifact.sha256(data),
        "from_cache": source != "made",
        "source": source,
        "seconds": round(time.perf_counter() - t0, 2),
        "fp32_units": report.fp32_units,
        "gate": report.gate,
    }
    on_event(EventKind.QUANTIZED, **info)
    q = spec.quantization
    # put apart in Ray's store, fetched by a worker only if its int8 fails the self-check
    fallback = Deferred(fp32_checkpoint(spec.model, spec.decoder)) if q.on_check_failure == "fp32" else None
    return Int8Payload(data, q.engine, q.on_check_failure, fallback, info["sha256"]), {"report": report, **info}


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
        raise InputError(
            f"cannot resume {out}: its int8 model {path} {what} "
            f"(the job's parts were made with the artifact sha256 {sha256[:16]}..., and a resume must "
            "use that same model, not a new quantization): put the file back, or start a new job with "
            "another --out"
        )
    return data
