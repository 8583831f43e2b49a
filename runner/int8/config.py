"""Quantization settings: one definition, validated in one place.

The job spec's `quantization:` section (`runner.job.spec.QuantizationSpec`, the keys a user writes) and
`asr-runner quantize`'s flags both become a `Settings` here, and both are checked by `problems()`, which
names each bad value by the key the user wrote (`key_names` maps a setting to a spec key or a flag).
"""

from __future__ import annotations

from collections.abc import Mapping

# Torch-free: the job spec imports this module.
from dataclasses import dataclass, fields

ENGINES = ("onednn", "x86", "fbgemm", "qnnpack")  # also `auto`'s preference order on near-ties
ENGINE_CHOICES = ("auto", *ENGINES)  # what a spec or `--engine` may name
ON_CHECK_FAILURE = ("fp32", "stop")  # what a worker does when its int8 fails the self-check at 8 and 7 bits
OBSERVERS = ("histogram", "minmax", "moving_average")


@dataclass(frozen=True)
class Settings:
    calibration_items: int = 100
    gate_items: int = 100  # held-out utterances the accuracy gate compares int8 with fp32 on
    max_wer_increase: float = 0.005  # a fraction: 0.005 = 0.5 WER points
    max_fp32_layers: int = 3  # units (encoder blocks, decoder) the gate may keep in fp32
    engine: str = "auto"  # engine the gate evaluates with (auto: the first candidate in preference order)
    observers: tuple[str, ...] = OBSERVERS
    seed: int = 0
    max_seconds: float = 30.0  # items longer than this take part as consecutive windows of this length
    early_stop: bool = True  # the gate may stop reading once its decision is clear (`runner.int8.gate`)

    def problems(self, key_names: Mapping[str, str] | None = None) -> list[str]:
        """One message per invalid value, naming it by `key_names[field]` (default: the field's name)."""
        names = key_names or {}
        checks = [
            (
                "engine",
                self.engine in ENGINE_CHOICES,
                f"must be one of {', '.join(ENGINE_CHOICES)}, got {self.engine!r}",
            ),
            (
                "calibration_items",
                _whole(self.calibration_items) and self.calibration_items >= 1,
                f"must be a positive integer, got {self.calibration_items!r}",
            ),
            (
                "gate_items",
                _whole(self.gate_items) and self.gate_items >= 1,
                f"must be a positive integer, got {self.gate_items!r}",
            ),
            (
                "max_fp32_layers",
                _whole(self.max_fp32_layers) and self.max_fp32_layers >= 0,
                f"must be an integer >= 0, got {self.max_fp32_layers!r}",
            ),
            (
                "max_wer_increase",
                _number(self.max_wer_increase) and 0 <= self.max_wer_increase < 1,
                f"is a fraction in [0, 1) (0.005 = 0.5 WER points), got {self.max_wer_increase!r}",
            ),
            (
                "observers",
                bool(self.observers) and all(o in OBSERVERS for o in self.observers),
                f"must name some of {', '.join(OBSERVERS)}, got {self.observers!r}",
            ),
            (
                "max_seconds",
                _number(self.max_seconds) and self.max_seconds > 0,
                f"must be a positive number, got {self.max_seconds!r}",
            ),
        ]
        return [f"{names.get(key, key)} {message}" for key, ok, message in checks if not ok]

    @classmethod
    def field_names(cls) -> tuple[str, ...]:
        return tuple(f.name for f in fields(cls))


def _number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _whole(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)
