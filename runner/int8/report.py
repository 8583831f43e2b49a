"""The quantization report: the record of how one int8 artifact was made, as the modules hand it on.

`runner.int8.pipeline` gathers it stage by stage; once quantization ends (made, or failed at the gate)
it is this frozen `QuantizationReport`: what `make_artifact`, `GateFailed`, the cache, the job and the
command line pass around. In the artifact's bytes and in a run's `quantization.json` it is the same
JSON object as before (`to_dict` / `from_dict` round-trip it exactly, keys this release does not know
included: an artifact made by another release reads back whole). Nested figures (gate, observers,
steps, sensitivity, self-check) stay plain JSON: docs/int8.md describes them. Scripts that read the
JSON by key can do the same here (`report["gate"]`, `report.get("observer")`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class QuantizationReport(Mapping):
    recipe_version: int | None = None
    settings: dict = field(default_factory=dict)  # `runner.int8.config.Settings` as used
    model: dict = field(default_factory=dict)  # file, sha256
    inputs: dict = field(default_factory=dict)  # what the artifact is made from, with its cache key
    calibration: dict = field(default_factory=dict)  # manifest, utterances, seconds, ids, skipped
    gate: dict = field(default_factory=dict)  # held-out set, mode, fp32 / int8 figures, increase, passed
    engine: str | None = None  # the engine the gate ran on
    activation_bits: int | None = None  # on this CPU (8, or 7 where int8 kernels saturate)
    attention_matmuls: str | None = None  # Conformers, on this CPU: bfloat16 (bf16 in hardware) or float32
    depthwise_convs: str | None = None  # conv family, on this CPU: runner-avx2 (no VNNI) or the engine's name
    cpu: dict = field(default_factory=dict)  # model, int8 flags
    observers: dict = field(default_factory=dict)  # candidate -> its gate figures
    observer: str | None = None  # the one chosen
    steps: list = field(default_factory=list)  # layers kept in fp32 one by one, with the gate figures
    sensitivity: list = field(default_factory=list)  # layers ranked by the error they cause
    fp32_units: list = field(default_factory=list)  # layers kept in fp32 (empty when the gate failed)
    self_check: dict = field(default_factory=dict)  # the reference every worker checks itself against
    size_mb: dict = field(default_factory=dict)  # fp32, int8
    seconds: float | None = None  # first-time quantization, all phases
    phase_seconds: dict = field(default_factory=dict)  # calibrate, convert, gate, fallback, self_check
    extra: dict = field(default_factory=dict)  # keys of other releases, kept as they were
    order: tuple = field(default=(), compare=False, repr=False)  # the keys as read, in their order

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> QuantizationReport:
        if isinstance(data, QuantizationReport):
            return data
        known = {f.name for f in dataclasses.fields(cls)} - {"extra", "order"}
        return cls(
            **{k: v for k, v in data.items() if k in known},
            extra={k: v for k, v in data.items() if k not in known},
            order=tuple(data),
        )

    def to_dict(self) -> dict[str, Any]:
        """The JSON object stored in the artifact and written as `quantization.json` (read from a dict:
        exactly its keys, in its order)."""
        names = self.order or [f.name for f in dataclasses.fields(self) if f.name not in ("extra", "order")]
        return {k: self.extra[k] if k in self.extra else getattr(self, k) for k in names}

    @property
    def passed(self) -> bool:
        return bool(self.gate.get("passed"))

    # A read-only view by key, as the JSON reads.
    def __getitem__(self, key: str) -> Any:
        return self.to_dict()[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self.to_dict())

    def __len__(self) -> int:
        return len(self.to_dict())
