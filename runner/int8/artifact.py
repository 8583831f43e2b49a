"""The int8 artifact: what the driver makes once and every worker rebuilds its model from.

Contents (one `torch.save` file, loadable with `weights_only=True`): the architecture
(`ModelSpec`: features config, encoder blocks, vocabulary), the fp32 mel front end's buffers,
the engine-neutral int8 state dict (int8 weights with per-channel scales, activation scales and
zero points calibrated on 8 bits), the units kept in fp32 with their weights, the recipe, the
quantization report and the self-check reference (`runner.int8.self_check`). It is identified by the
sha256 of its bytes.

A worker calls `build_int8_model(data, engine)`: torch only (no NeMo, no calibration, no fp32
weights for the int8 units); with `engine="auto"` it times the candidate engines on its own CPU
first and keeps the fastest, so a cluster can mix CPUs. It then checks its int8 model against
the reference: with the activation bits its CPU needs (`quantize.activation_bits`), and if that
fails, with 7-bit activations; if both fail it raises `Int8CheckFailed` (the worker decides what
then: `runner.job.worker`).
"""

from __future__ import annotations

import hashlib
import io
import logging
import os
import time
import warnings
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from runner.errors import InputError, QuantizationError
from runner.int8 import self_check as int8_check
from runner.int8.engines import (
    activation_bits,
    candidate_engines,
    choice_key,
    remember_choice,
    remembered_choice,
    resolve_engine,
)
from runner.int8.model import Int8Model, load_int8
from runner.int8.report import QuantizationReport
from runner.model.arch import ModelSpec
from runner.model.features import MelFeatures

log = logging.getLogger(__name__)

FORMAT = "asr-runner/int8-ctc/2"  # 2: activation bits per CPU, the self-check reference


@dataclass
class Artifact:
    spec: ModelSpec
    features: dict  # fp32 buffers of the mel front end
    int8: dict  # engine-neutral state dict of the quantized encoder + decoder
    float_units: list[int] = field(default_factory=list)  # units kept in fp32 by the accuracy gate
    recipe: dict = field(default_factory=dict)  # observers, dtypes: how the int8 weights were made
    report: QuantizationReport = field(default_factory=QuantizationReport)  # calibration, gate, sensitivity, ...
    reference: dict = field(default_factory=dict)  # fp32 features + logits every worker checks its int8 against

    def to_bytes(self) -> bytes:
        buf = io.BytesIO()
        with _no_storage_warnings():
            torch.save(
                {
                    "format": FORMAT,
                    "spec": self.spec.to_dict(),
                    "features": self.features,
                    "int8": self.int8,
                    "float_units": list(self.float_units),
                    "recipe": self.recipe,
                    "report": self.report.to_dict(),
                    "reference": self.reference,
                },
                buf,
            )
        return buf.getvalue()

    @classmethod
    def from_bytes(cls, data: bytes, where: str = "artifact") -> Artifact:
        try:
            with _no_storage_warnings():
                raw = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
        except Exception as exc:  # noqa: BLE001 - any unreadable file gets the same clear message
            raise InputError(
                f"{where}: not an asr-runner int8 artifact ({type(exc).__name__}: {exc}); "
                "make one with `asr-runner quantize`"
            ) from None
        if not isinstance(raw, dict) or raw.get("format") != FORMAT:
            raise InputError(
                f"{where}: not an asr-runner int8 artifact (format {FORMAT}); make one with `asr-runner quantize`"
            )
        return cls(
            ModelSpec.from_dict(raw["spec"]),
            raw["features"],
            raw["int8"],
            list(raw["float_units"]),
            raw["recipe"],
            QuantizationReport.from_dict(raw["report"]),
            raw["reference"],
        )


@contextmanager
def _no_storage_warnings():
    """(De)serializing quantized tensors warns twice (TypedStorage and quantized tensors are
    deprecated); both are torch internals a user cannot act on."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def save(data: bytes, path: str | os.PathLike) -> None:
    """Write artifact bytes atomically (temp file + rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def read(path: str | os.PathLike) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as exc:
        raise InputError(f"{path}: cannot read the int8 artifact ({exc.strerror})") from None


class Int8CheckFailed(QuantizationError):
    """The int8 model's self-check failed on this CPU at every activation width tried."""

    def __init__(self, message: str, check: dict):
        super().__init__(message)
        self.check = check


@dataclass
class LoadedModel:
    model: Any  # quantize.Int8Model
    engine: str
    engine_seconds: dict[str, float]  # auto: each candidate's time for 1 s of audio; else {}
    load_seconds: float
    int8_check: dict = field(default_factory=dict)  # the self-check (`runner.int8.self_check.check`) of `model`
    engine_choice: str = "named"  # named | probed (auto timed the candidates) | remembered (auto's earlier
    # probe on this node, `runner.int8.engines.remembered_choice`) | preferred (auto with one candidate: onednn
    # for the conv family)


def build_int8_model(data: bytes | Artifact, engine: str = "auto", data_sha256: str | None = None) -> LoadedModel:
    """The int8 model for this process's CPU, self-checked: `engine="auto"` times the candidates and keeps
    the fastest (or what it kept before on this node for these bytes); activation bits follow the CPU, then
    7 bits if the check fails. `data_sha256`: the bytes' hash when the caller has it (a job's workers get it
    from the driver: a 0.6B model's artifact takes ~1 s to hash). Raises `Int8CheckFailed`."""
    t0 = time.perf_counter()
    art = data if isinstance(data, Artifact) else Artifact.from_bytes(data)
    with torch.device("meta"):
        features = MelFeatures(art.spec.features)
    features.load_state_dict(art.features, strict=True, assign=True)
    features.eval()
    # `auto`: each candidate is built, probed and released in turn; the winner is built again. The choice is
    # remembered on this node for this artifact, CPU, torch and thread count: later starts skip the probe
    # (3.6 s of a QuartzNet15x5 worker's 4.2 s start, 1 thread, AMD EPYC avx2).
    key = None
    if engine == "auto" and len(candidate_engines(art.spec)) > 1:  # one candidate: nothing to time or remember
        named = data_sha256 or (sha256(data) if isinstance(data, bytes) else None)
        key = choice_key(named, art.spec) if named else None
    known = remembered_choice(key) if key else None
    if known is not None:
        (engine, timings), how = known, "remembered"
    else:
        how = "named" if engine != "auto" else "probed"
        engine, timings = resolve_engine(
            engine, lambda name: load_int8(art.spec, art.int8, name, art.float_units), art.spec
        )
        if key and timings:
            remember_choice(key, engine, timings)
        how = how if timings or how == "named" else "preferred"  # a single candidate: nothing to time
    bits = activation_bits(engine)
    attempts: list[dict] = []
    for width in [bits] + ([7] if bits == 8 else []):
        qencoder = load_int8(art.spec, art.int8, engine, art.float_units, width)
        model = Int8Model(art.spec, features, qencoder, engine).eval()
        attempts.append(int8_check.check(model, art.reference))
        if attempts[-1]["passed"]:
            break
        log.warning(
            "int8 self-check failed on %s with %d-bit activations (logit cosine %.4f, frame agreement "
            "%.3f; expected %s)",
            engine,
            width,
            attempts[-1]["logit_cosine"],
            attempts[-1]["frame_agreement"],
            attempts[-1]["expected"],
        )
    result = {
        **attempts[-1],
        "fallback": f"{attempts[-1]['activation_bits']}-bit activations" if len(attempts) > 1 else None,
        "attempts": attempts,
    }
    if not result["passed"]:
        widths = " or ".join(str(a["activation_bits"]) for a in attempts)
        raise Int8CheckFailed(
            f"int8 on this CPU ({engine} engine) does not match fp32 at {widths}-bit activations "
            f"(logit cosine {result['logit_cosine']:.4f}, frame agreement "
            f"{result['frame_agreement']:.3f}; expected {result['expected']})",
            result,
        )
    seconds = {k: round(v, 5) for k, v in timings.items()}
    return LoadedModel(model, engine, seconds, time.perf_counter() - t0, result, how)
