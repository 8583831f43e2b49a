"""Worker side: a shard of manifest items -> result rows. Torch only: no NeMo, no Ray.

`transcribe_items` is the plain function (tests call it directly); `ShardWorker` is the
callable class the orchestrator wraps in a Ray actor: `__init__` builds the model once from a
`WorkerPayload` (`Fp32Payload` or `Int8Payload`), `__call__` does a shard. An item that cannot be
read or transcribed becomes an error row naming its id and path; the shard always completes.
"""

from __future__ import annotations

import io
import logging
import os
import socket
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from runner.errors import AudioLoadError
from runner.inputs.audio import load_audio
from runner.inputs.manifest import ManifestItem
from runner.model.ctc import load_checkpoint
from runner.model.transcribe import DecodeOptions, frame_seconds, transcribe, word_aligner
from runner.model.words import WordAligner
from runner.sysinfo import peak_rss_mb
from runner.timing import WORKER_STAGES

log = logging.getLogger(__name__)

MIN_SAMPLES = 400  # shorter than one analysis window: nothing to transcribe, empty text


@dataclass(frozen=True)
class Fp32Payload:
    """What every worker needs to rebuild the fp32 model (put in Ray's object store once)."""

    spec: dict  # `ModelSpec.to_dict()`
    state_dict: dict


@dataclass(frozen=True)
class Int8Payload:
    """The int8 artifact every worker rebuilds and self-checks, and what to do when its check fails."""

    artifact: bytes  # `runner.int8.artifact` bytes
    engine: str = "auto"  # auto: each worker picks its own
    # fp32: run the fp32 model where the self-check fails at 8 and 7 bits; stop: the job stops (the safe default)
    on_check_failure: str = "stop"
    # the fp32 checkpoint's bytes, fetched only by a worker that falls back (`ray_pool.Deferred` on a cluster)
    fp32_checkpoint: Callable[[], bytes] | None = None


WorkerPayload = Fp32Payload | Int8Payload


@dataclass
class ShardResult:
    shard: int
    rows: list[dict]
    audio_seconds: float
    compute_seconds: float
    worker: str
    engine: str = "fp32"
    stages: dict[str, float] = field(default_factory=dict)  # seconds per stage (WORKER_STAGES), within compute
    peak_rss_mb: float = 0.0  # the worker process's peak resident memory so far


def transcribe_items(
    model, items: Sequence[ManifestItem], shard: int, options: DecodeOptions, aligner: WordAligner | None = None
) -> tuple[list[dict], dict]:
    """Rows (Parquet schema) for `items`, in their order; and seconds spent per stage:
    read (decode from file), resample, features, encoder, decode (greedy CTC)."""
    rate = model.spec.features.sample_rate
    rows, audios, stages = [], {}, dict.fromkeys(WORKER_STAGES, 0.0)
    for i, item in enumerate(items):
        rows.append(item_row(item, shard))
        try:
            audio = _read(item, rate, stages)
        except AudioLoadError as exc:
            mark_failed(rows[i], item, str(exc))
            continue
        rows[i]["duration"] = len(audio) / rate
        if len(audio) < MIN_SAMPLES or not audio.any():
            rows[i]["text"] = ""  # too short to analyse, or digital silence: no speech (the model may babble)
        else:
            audios[i] = audio
    if aligner is None and options.confidence is not None:
        aligner = word_aligner(model, options.confidence)
    offsets = {i: item.offset or 0.0 for i, item in enumerate(items)}
    for i, result in _transcribe_isolating_failures(model, audios, offsets, options, aligner, stages).items():
        if isinstance(result, Exception):
            mark_failed(rows[i], items[i], f"transcription failed: {type(result).__name__}: {result}")
        else:
            rows[i].update(text=result.text, words=result.words, confidence=result.confidence)
    if options.confidence is not None:  # too short or silent: no words, and nothing to doubt
        for i, row in enumerate(rows):
            if row["status"] == "ok" and i not in audios:
                row.update(words=[], confidence=None)
    return rows, stages


def item_row(item: ManifestItem, shard: int) -> dict:
    """The item's row (Parquet schema) before it is transcribed: status ok, no text yet."""
    return {
        "id": item.id,
        "audio_filepath": item.audio_filepath,
        "offset": item.offset,
        "duration": item.duration,
        "text": None,
        "reference": item.text,
        "status": "ok",
        "error": None,
        "shard": shard,
        "words": None,
        "confidence": None,
    }


def mark_failed(row: dict, item: ManifestItem, reason: str) -> None:
    """Make `row` an error row whose reason names the item's id and path."""
    reason = reason.removeprefix(f"{item.audio_filepath}: ")  # audio errors start with the path: say it once
    row.update(status="error", text=None, error=f"id {item.id} ({item.audio_filepath}): {reason}")


def _read(item: ManifestItem, rate: int, timings: dict) -> np.ndarray:
    """The item's samples; `offset` and `duration` select a segment, as in NeMo's data layer."""
    return load_audio(item.audio_filepath, rate, offset=item.offset, duration=item.duration, timings=timings)


def _transcribe_isolating_failures(
    model, audios: dict[int, np.ndarray], offsets: dict[int, float], options: DecodeOptions, aligner, timings: dict
) -> dict[int, Any]:
    """`Transcript`s by row index; if a batch fails, retry its items one by one so only the culprit fails."""
    ids = list(audios)

    def run(batch: list[int]) -> list:
        return transcribe(model, [audios[i] for i in batch], options, timings, aligner, [offsets[i] for i in batch])

    try:
        return dict(zip(ids, run(ids)))
    except Exception as exc:  # noqa: BLE001 - any failure becomes data, inside the budget
        log.warning("batch failed (%s); retrying items one at a time", exc)
    out: dict[int, Any] = {}
    for i in ids:
        try:
            out[i] = run([i])[0]
        except Exception as exc:  # noqa: BLE001
            out[i] = exc
    return out


class ShardWorker:
    """Holds one model (lean fp32, or int8 rebuilt from the artifact and self-checked); called once per shard."""

    def __init__(self, payload: WorkerPayload, threads: int, options: DecodeOptions):
        import torch

        torch.set_num_threads(threads)
        self.options = options
        self.name = f"{socket.gethostname()}:{os.getpid()}"
        self.engine_seconds: dict[str, float] = {}
        self.int8_check: dict | None = None
        t0 = time.perf_counter()
        if isinstance(payload, Int8Payload):
            self._load_int8(payload)
        else:
            self.model, self.engine = _fp32_model(payload.spec, payload.state_dict), "fp32"
        self.load_seconds = time.perf_counter() - t0
        # built once per worker (vocabulary punctuation, token texts), not per shard
        self.aligner = word_aligner(self.model, options.confidence) if options.confidence is not None else None

    def _load_int8(self, payload: Int8Payload) -> None:
        """The self-checked int8 model; if its check fails at every activation width, the fp32 model
        (`on_check_failure: fp32`, fetched only now) or the failure itself (`stop`: the job stops)."""
        from runner.int8.artifact import Int8CheckFailed, build_int8_model

        try:
            loaded = build_int8_model(payload.artifact, payload.engine)
        except Int8CheckFailed as exc:
            if payload.on_check_failure != "fp32" or payload.fp32_checkpoint is None:
                why = (
                    "quantization.on_check_failure is stop"
                    if payload.on_check_failure != "fp32"
                    else "no fp32 weights were sent to fall back on"
                )
                raise Int8CheckFailed(
                    f"worker {self.name}: {exc}; {why}, so the job stops before this worker "
                    "transcribes (set on_check_failure: fp32 to run such workers in fp32, or "
                    "run the job with precision fp32)",
                    exc.check,
                ) from None
            log.error(
                "worker %s: %s; THIS WORKER RUNS THE fp32 MODEL (quantization.on_check_failure: fp32)", self.name, exc
            )
            self.engine_seconds, self.int8_check = {}, {**exc.check, "fallback": "fp32 model"}
            checkpoint = load_checkpoint(io.BytesIO(payload.fp32_checkpoint()))
            self.model, self.engine = _fp32_model(*checkpoint), "fp32"
            return
        self.model, self.engine, self.engine_seconds = loaded.model, loaded.engine, loaded.engine_seconds
        self.int8_check = loaded.int8_check

    def __call__(self, shard: int, items: list[ManifestItem]) -> ShardResult:
        t0 = time.perf_counter()
        rows, stages = transcribe_items(self.model, items, shard, self.options, self.aligner)
        audio = sum(r["duration"] or 0.0 for r in rows if r["status"] == "ok")
        return ShardResult(
            shard, rows, audio, time.perf_counter() - t0, self.name, self.engine, stages, round(peak_rss_mb(), 1)
        )

    def info(self) -> dict:
        """Who this worker is and how its model loaded (`worker` names it to the pool)."""
        from runner.sysinfo import cpu_info

        heavy = sorted({m.split(".")[0] for m in sys.modules} & {"nemo", "lightning", "pytorch_lightning"})
        return {
            "worker": self.name,
            "engine": self.engine,
            "engine_seconds": self.engine_seconds,
            "int8_check": self.int8_check,
            "load_seconds": round(self.load_seconds, 3),
            "heavy_imports": heavy,
            "cpu": cpu_info()["model"],
            "peak_rss_mb": round(peak_rss_mb(), 1),
            "frame_seconds": frame_seconds(self.model.spec),  # the step of word times
        }


def _fp32_model(spec, state_dict):
    from runner.model.arch import ModelSpec
    from runner.model.ctc import build_model

    return build_model(spec if isinstance(spec, ModelSpec) else ModelSpec.from_dict(spec), state_dict)
