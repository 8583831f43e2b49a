"""Worker side: a shard of manifest items -> result rows. Torch only: no NeMo, no Ray.

`transcribe_items` is the plain function (tests call it directly); `ShardWorker` is the
callable class the orchestrator wraps in a Ray actor: `__init__` builds the model once from a
`WorkerPayload` (`Fp32Payload` or `Int8Payload`), `__call__` does a shard. An item that cannot be
read or transcribed becomes an error row naming its id and path; the shard always completes.
"""

from __future__ import annotations

import dataclasses
import io
import logging
import math
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
from runner.inputs.split import SegmentItem
from runner.model.ctc import load_checkpoint
from runner.model.features import FeatureSums
from runner.model.transcribe import DecodeOptions, frame_seconds, long_outputs, raw_log_mel, transcribe, word_aligner
from runner.model.words import WordAligner
from runner.sysinfo import peak_rss_mb
from runner.timing import WORKER_STAGES, timed

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
    sha256: str | None = None  # the artifact's, hashed once on the driver (keys `auto`'s remembered choice)


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
    if aligner is None and options.confidence is not None:
        aligner = word_aligner(model, options.confidence)
    if items and isinstance(items[0], SegmentItem):
        return [transcribe_segment(model, seg, shard, options, aligner, stages) for seg in items], stages
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


def transcribe_segment(
    model, seg: SegmentItem, shard: int, options: DecodeOptions, aligner: WordAligner | None, stages: dict
) -> dict:
    """One segment of a long line -> its frames: the best class and (with words) the confidence of each
    output frame whose start lies in the segment's span, numbered from the line's start.

    The output frames of a line lie on one grid (a frame every hop x subsampling samples from the line's
    first sample), so the spans of a line's segments share out its frames exactly. The segment is read
    with `context_seconds` of audio on each side, on that grid, so its encoder sees what lies around the
    cut; the context's frames are dropped here and the driver decodes the line's frames in one pass.
    Its log-mel is normalized with the whole line's statistics (`seg.norm`, summed from every segment's
    `segment_feature_sums`), so a segment's frames are the whole line's.
    """
    if seg.sums_only:
        return segment_feature_sums(model, seg, shard, stages)
    row = item_row(seg, shard)
    features = model.spec.features
    step = features.hop_length * model.spec.encoder.subsampling
    context = math.ceil(options.context_seconds * features.sample_rate / step)
    first, last, read_first, audio = _read_span(seg, features.sample_rate, step, context, row, stages)
    if audio is None:
        return row
    try:
        # one pass over the segment and its context: no windows inside it, each would add its own context
        whole = dataclasses.replace(options, window_seconds=len(audio) / features.sample_rate + 1.0)
        outputs = long_outputs(model, audio, whole, stages, norm=seg.norm)
        kept = outputs[first - read_first : None if last is None else last - read_first]
        with timed(stages, "decode"):
            best = kept.argmax(dim=-1)
        with timed(stages, "words"):
            confidence = aligner.confidences(kept.unsqueeze(0)) if aligner is not None else None
    except Exception as exc:  # noqa: BLE001 - a failing segment becomes data, inside the budget
        mark_failed(row, seg, f"transcription failed: {type(exc).__name__}: {exc}")
        return row
    row.update(
        first_frame=first, best=best.tolist(), frame_confidence=None if confidence is None else confidence[0].tolist()
    )
    return row


def segment_feature_sums(model, seg: SegmentItem, shard: int, stages: dict) -> dict:
    """What a segment's own log-mel frames add to its line's normalization statistics (`FeatureSums`),
    read with a margin of a few frames so each frame is computed as in the whole line."""
    row = item_row(seg, shard)
    features = model.spec.features
    sub = model.spec.encoder.subsampling
    margin = math.ceil(features.n_fft / features.hop_length) + 1
    # feature frames, on the output frames' grid: the segments' sums cover the line's frames exactly once
    first, last, read_first, audio = _read_span(
        seg, features.sample_rate, features.hop_length, margin, row, stages, sub
    )
    if audio is None:
        return row
    try:
        with timed(stages, "features"):
            own = raw_log_mel(model, audio)[:, first - read_first : None if last is None else last - read_first]
            row["sums"] = FeatureSums.of(own)
    except Exception as exc:  # noqa: BLE001
        mark_failed(row, seg, f"features failed: {type(exc).__name__}: {exc}")
    return row


def _read_span(seg: SegmentItem, rate: int, unit: int, margin: int, row: dict, stages: dict, per_frame: int = 1):
    """The segment's frames of `unit` samples: its first, its end (None: the line's end), the first one read,
    and the samples read (`margin` frames more on each side, within the line); None after marking `row`
    failed when the audio cannot be read. `per_frame`: frames per output frame (the grid cuts lie on)."""
    span, item = seg.span, seg.item
    step = unit * per_frame
    first = math.ceil(span.start * rate / step - 1e-6) * per_frame
    last = None if span.cut == "end" else math.ceil(span.end * rate / step - 1e-6) * per_frame
    read_first = max(0, first - margin)
    begin = read_first * unit / rate
    length = None if item.duration is None else item.duration - begin
    if last is not None:
        wanted = (last + margin - read_first) * unit / rate
        length = wanted if length is None else min(length, wanted)
    try:
        audio = load_audio(item.audio_filepath, rate, offset=item.offset + begin, duration=length, timings=stages)
    except AudioLoadError as exc:
        mark_failed(row, seg, str(exc))
        return first, last, read_first, None
    return first, last, read_first, audio


def item_row(item: ManifestItem | SegmentItem, shard: int) -> dict:
    """The item's row (Parquet schema) before it is transcribed: status ok, no text yet; for a segment,
    its row in `segments/` (`runner.job.segments.SEGMENT_SCHEMA`), no frames yet."""
    if isinstance(item, SegmentItem):
        return {
            "id": item.id,
            "audio_filepath": item.audio_filepath,
            "offset": item.item.offset,
            "reference": item.item.text,
            "shard": shard,
            "segment": item.index,
            "segments": item.count,
            "start": item.span.start,
            "end": item.span.end,
            "cut": item.span.cut,
            "duration": item.duration,
            "status": "ok",
            "error": None,
            "first_frame": None,
            "best": None,
            "frame_confidence": None,
        }
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
        "segments": None,
    }


def mark_failed(row: dict, item: ManifestItem | SegmentItem, reason: str) -> None:
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
        self.engine_choice: str | None = None  # int8: named | probed | remembered | preferred
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
            loaded = build_int8_model(payload.artifact, payload.engine, payload.sha256)
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
        self.engine_choice = loaded.engine_choice
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
            "engine_choice": self.engine_choice,
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
