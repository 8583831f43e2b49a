"""Job specs: YAML -> frozen `JobSpec`, validated once, round-tripping to JSON (`job.json`).

Relative paths resolve against the spec file's folder. Unknown keys are an error that names
them; every error is one line naming the key and what is allowed.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from runner.errors import InputError
from runner.int8.config import ON_CHECK_FAILURE, Settings
from runner.model.words import ConfidenceMethod

PRECISIONS = ("int8", "fp32")
DEMO_MODEL = Path(__file__).resolve().parents[1] / "data" / "demo_quartznet.nemo"  # `model: demo`
# shard_timeout_seconds: auto: a worker must transcribe at >= 0.5x real time, plus time to start and read
SHARD_TIMEOUT_BASE_SECONDS = 120.0
SHARD_TIMEOUT_PER_AUDIO_SECOND = 2.0
SHARD_TIMEOUT_UNKNOWN_AUDIO_SECONDS = 60.0  # what an item counts for when nobody could tell its duration


class SpecError(InputError):
    """A job spec is invalid; the message names the file and the key."""


@dataclass(frozen=True)
class QuantizationSpec:
    engine: str = "auto"  # auto | onednn | x86 | fbgemm | qnnpack
    calibration_manifest: str | None = None  # default: a reproducible sample of the job's manifest
    calibration_items: int = 100
    gate_items: int = 100  # held-out utterances the accuracy gate compares int8 with fp32 on
    max_wer_increase: float = 0.005  # accuracy gate, a fraction (0.005 = 0.5 WER points)
    max_fp32_layers: int = 3  # layers (encoder blocks, decoder) the gate may keep in fp32
    # A worker whose int8 model fails its self-check at 8 and at 7 bits: `fp32` runs the fp32 model
    # there (slower, correct, reported loudly); `stop` fails the job before that worker transcribes.
    on_check_failure: str = "fp32"

    def settings(self) -> Settings:
        """What the int8 pipeline runs with (`runner.int8.config`, which also validates these keys)."""
        return Settings(
            calibration_items=self.calibration_items,
            gate_items=self.gate_items,
            max_wer_increase=self.max_wer_increase,
            max_fp32_layers=self.max_fp32_layers,
            engine=self.engine,
        )


@dataclass(frozen=True)
class JobSpec:
    model: str  # path to a .nemo file (or a lean checkpoint), or `demo`
    manifest: str  # NeMo JSONL, optionally .gz
    output: str  # run directory
    precision: str = "int8"
    workers: int | None = None  # Ray actors; default: one per CPU of the cluster
    threads_per_worker: int = 1  # torch threads in each actor (measured: 1 per CPU is fastest)
    shard_seconds: float = 600.0  # target audio seconds per shard
    max_failed: float = 0.01  # error budget: a fraction of items, or a count if >= 1
    batch_size: int = 8  # utterances per forward pass inside a worker
    window_seconds: float = 40.0  # longer files are encoded in windows
    # A line longer than `split_seconds` is cut into segments of about `segment_seconds`, at pauses, which
    # run on all workers at once and are joined back into its one row (`runner.inputs.split`); 0: never split.
    split_seconds: float = 300.0
    segment_seconds: float = 120.0
    # A shard (or, once its shard timed out, one item) that runs longer is stopped: its worker is replaced, and
    # an item that hangs alone becomes an error row. auto | seconds | null (no limit). See `time_limit`.
    shard_timeout_seconds: str | float | None = "auto"
    # Words with start/end seconds and confidence in the Parquet `words` column, and an utterance `confidence`
    # (`runner.model.words`); `confidence` chooses the method (NeMo's ConfidenceConfig names and defaults).
    timestamps: bool = True
    confidence: ConfidenceMethod = field(default_factory=ConfidenceMethod)
    # A hybrid transducer/CTC model's head: rnnt (its transducer, the model's default) or ctc; None: the default.
    decoder: str | None = None
    quantization: QuantizationSpec = field(default_factory=QuantizationSpec)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any], where: str = "job spec") -> JobSpec:
        data = dict(data)
        _check_keys(data, cls, where)
        quant = data.pop("quantization", None) or {}
        if not isinstance(quant, dict):
            raise SpecError(f"{where}: quantization must be a mapping of keys, got {type(quant).__name__}")
        _check_keys(quant, QuantizationSpec, where, prefix="quantization.")
        confidence = data.pop("confidence", None) or {}
        if isinstance(confidence, ConfidenceMethod):
            confidence = dataclasses.asdict(confidence)
        if not isinstance(confidence, dict):
            raise SpecError(f"{where}: confidence must be a mapping of keys, got {type(confidence).__name__}")
        _check_keys(confidence, ConfidenceMethod, where, prefix="confidence.")
        missing = [k for k in ("model", "manifest", "output") if data.get(k) in (None, "")]
        if missing:
            raise SpecError(f"{where}: missing required key(s): {', '.join(missing)}")
        spec = cls(**data, quantization=QuantizationSpec(**quant), confidence=ConfidenceMethod(**confidence))
        verify(spec, where)
        return spec

    def max_failed_items(self, total: int) -> int:
        """The error budget as a count of items."""
        return int(self.max_failed) if self.max_failed >= 1 else int(self.max_failed * total)


def time_limit(setting: str | float | None, audio_seconds: float) -> float | None:
    """The wall-clock limit of one worker call (a shard, or one item), from `shard_timeout_seconds`.

    `auto`: SHARD_TIMEOUT_BASE_SECONDS (120) + SHARD_TIMEOUT_PER_AUDIO_SECOND (2.0) x the call's audio
    seconds: a worker slower than half real time is stuck, not slow (a read from a mount that stopped
    answering, a named pipe without a writer), and the base covers reading, a cold cache and short calls.
    A number: that many seconds whatever the audio. None: no limit (wait as long as it takes).
    The pool counts a call's audio (`shard_pool.audio_seconds`): an item whose duration neither the manifest
    nor its header told counts as SHARD_TIMEOUT_UNKNOWN_AUDIO_SECONDS (60).
    """
    if setting is None:
        return None
    if setting == "auto":
        return SHARD_TIMEOUT_BASE_SECONDS + SHARD_TIMEOUT_PER_AUDIO_SECOND * max(audio_seconds, 0.0)
    return float(setting)


def _check_keys(data: dict, cls, where: str, prefix: str = "") -> None:
    allowed = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - allowed)
    if unknown:
        names = ", ".join(prefix + k for k in unknown)
        raise SpecError(f"{where}: unknown key(s) {names}; allowed: {', '.join(prefix + k for k in sorted(allowed))}")


def verify(spec: JobSpec, where: str) -> None:
    """One-line errors naming the offending key (whisper's `_verify_options` style)."""
    q = spec.quantization
    checks = [
        (spec.precision in PRECISIONS, f"precision must be one of {', '.join(PRECISIONS)}, got {spec.precision!r}"),
        (
            spec.workers is None or (isinstance(spec.workers, int) and spec.workers >= 1),
            f"workers must be a positive integer, got {spec.workers!r}",
        ),
        (
            isinstance(spec.threads_per_worker, int) and spec.threads_per_worker >= 1,
            f"threads_per_worker must be a positive integer, got {spec.threads_per_worker!r}",
        ),
        (
            _number(spec.shard_seconds) and spec.shard_seconds > 0,
            f"shard_seconds must be a positive number, got {spec.shard_seconds!r}",
        ),
        (
            _number(spec.max_failed)
            and spec.max_failed >= 0
            and (spec.max_failed < 1 or float(spec.max_failed).is_integer()),
            f"max_failed must be a fraction in [0, 1) or a whole count >= 1, got {spec.max_failed!r}",
        ),
        (
            isinstance(spec.batch_size, int) and spec.batch_size >= 1,
            f"batch_size must be >= 1, got {spec.batch_size!r}",
        ),
        (
            _number(spec.window_seconds) and spec.window_seconds >= 5,
            f"window_seconds must be a number >= 5, got {spec.window_seconds!r}",
        ),
        (
            _number(spec.split_seconds) and spec.split_seconds >= 0,
            f"split_seconds must be a number of seconds >= 0 (0: never split), got {spec.split_seconds!r}",
        ),
        (
            _number(spec.segment_seconds) and spec.segment_seconds >= 30,
            f"segment_seconds must be a number >= 30, got {spec.segment_seconds!r}",
        ),
        (
            not (_number(spec.split_seconds) and _number(spec.segment_seconds))
            or not spec.split_seconds
            or spec.split_seconds >= spec.segment_seconds,
            f"split_seconds ({spec.split_seconds!r}) must be 0 or at least segment_seconds ({spec.segment_seconds!r})",
        ),
        (
            spec.shard_timeout_seconds in (None, "auto")
            or (_number(spec.shard_timeout_seconds) and 0 < spec.shard_timeout_seconds < float("inf")),
            f"shard_timeout_seconds must be auto, a positive number of seconds or null (no limit), "
            f"got {spec.shard_timeout_seconds!r}",
        ),
        (
            q.on_check_failure in ON_CHECK_FAILURE,
            f"quantization.on_check_failure must be one of {', '.join(ON_CHECK_FAILURE)}, got {q.on_check_failure!r}",
        ),
    ]
    checks.append((isinstance(spec.timestamps, bool), f"timestamps must be true or false, got {spec.timestamps!r}"))
    checks.append((spec.decoder in (None, "rnnt", "ctc"), f"decoder must be rnnt or ctc, got {spec.decoder!r}"))
    checks += [(False, message) for message in spec.confidence.problems("confidence.")]
    prefixed = {name: f"quantization.{name}" for name in Settings.field_names()}
    checks += [(False, message) for message in q.settings().problems(prefixed)]
    for ok, message in checks:
        if not ok:
            raise SpecError(f"{where}: {message}")


def _number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def load_spec(path: str | os.PathLike, **overrides: Any) -> JobSpec:
    """Read a YAML spec; `overrides` (CLI flags, None = not given) replace its keys before validation."""
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise SpecError(f"{path}: job spec not found") from None
    except yaml.YAMLError as exc:
        raise SpecError(f"{path}: not valid YAML ({str(exc).splitlines()[0]})") from None
    if not isinstance(data, dict):
        raise SpecError(f"{path}: a job spec is a mapping of keys (model, manifest, output, ...)")
    data.update({k: v for k, v in overrides.items() if v is not None})
    base = path.resolve().parent
    if data.get("model") == "demo":
        data["model"] = str(DEMO_MODEL)
    for key in ("model", "manifest", "output"):
        if isinstance(data.get(key), str):
            data[key] = str((base / os.path.expanduser(data[key])).resolve())
    quant = data.get("quantization")
    if isinstance(quant, dict) and isinstance(quant.get("calibration_manifest"), str):
        quant["calibration_manifest"] = str((base / quant["calibration_manifest"]).resolve())
    return JobSpec.from_dict(data, where=str(path))
