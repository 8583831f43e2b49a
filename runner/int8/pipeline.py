"""Driver side of int8: sample audio, calibrate, choose observers, gate accuracy, make the artifact.

    samples (seeded, calibration kept apart from the gate's held-out items; files longer than
             `max_seconds` take part as consecutive windows of that length)        (runner.int8.samples)
    -> one calibration pass observes with every candidate activation observer at once,
       then each candidate is converted                                         (runner.int8.model)
    -> held-out gate, chunk by chunk: fp32 once, every candidate against it (WER/CER with
       references, else agreement with fp32 transcripts, plus logit similarity); the best
       candidate is kept; the gate stops early only once its decision is clear (runner.int8.gate)
    -> over the tolerance: per-unit sensitivity (logit error with that unit kept in fp32),
       then the most sensitive units go back to fp32 one by one until the gate passes, or
       `max_fp32_layers` is reached and quantization fails with the report (exit 1)
    -> Artifact (runner.int8.artifact), cached on disk by what it was made from: model, manifests,
       settings, the sampled audio files and the quantization code (runner.int8.cache).

Runs where the fp32 model already is (the job driver, `asr-runner quantize`). No Ray here.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from contextlib import contextmanager
from dataclasses import asdict

import numpy as np
import torch

from runner.errors import QuantizationError
from runner.int8 import depthwise
from runner.int8.artifact import Artifact, build_int8_model
from runner.int8.config import Settings
from runner.int8.engines import activation_bits, engine_scope, resolve_engine
from runner.int8.gate import CHUNKS, MIN_CHUNKS, GateSet, feature_batches, public
from runner.int8.model import (
    Int8Model,
    attention_matmuls,
    calibrate,
    convert,
    fallback_possible,
    int8_reader,
    prepare,
    rebuild,
    with_float_units,
)
from runner.int8.observers import use_observer
from runner.int8.report import QuantizationReport
from runner.int8.self_check import REFERENCE_ITEMS, REFERENCE_SECONDS, measure
from runner.model.ctc import LeanModel
from runner.sysinfo import cpu_info, int8_flags

log = logging.getLogger(__name__)

RECIPE_VERSION = 4  # bump when the recipe changes what an artifact holds: invalidates the cache
# (2: Conformer static int8; 3: activation bits per CPU, the self-check reference; 4: the reference from
# the gate's own fp32 outputs, a gate read in chunks)


class GateFailed(QuantizationError):
    """int8 accuracy stayed outside the tolerance even with `max_fp32_layers` units in fp32."""

    def __init__(self, message: str, report: QuantizationReport):
        super().__init__(message)
        self.report = report


# --------------------------------------------------------------------------- quantizing
def quantize_model(
    model: LeanModel,
    calibration: Sequence[np.ndarray],
    gate_audio: Sequence[np.ndarray],
    references: list[str] | None,
    settings: Settings = Settings(),
    info: dict | None = None,
) -> Artifact:
    """Calibrated, gated int8 artifact of `model`; raises `GateFailed` (with the report) if int8 is not accurate
    enough."""
    clock = _Phases()
    report = _start_report(model, calibration, gate_audio, settings, info)
    with clock("calibrate"):  # one pass over the calibration audio calibrates every candidate observer
        observed = _calibrated(model, calibration, settings.observers)
    with clock("convert"):
        engine, _ = resolve_engine(settings.engine)  # `auto`: the preferred candidate, untimed; workers time theirs
        bits = activation_bits(engine)  # the same rule as every worker's, on this CPU
        report.update(engine=engine, activation_bits=bits, cpu=_cpu())
        converted = _converted(observed, settings.observers, engine)
        attention = attention_matmuls(next(iter(converted.values())))  # Conformers: this CPU's, as on workers
        if attention is not None:
            report.update(attention_matmuls=attention)
        else:  # the conv family: our AVX2 depthwise kernel on CPUs without VNNI, as on workers
            report.update(depthwise_convs=depthwise.kernel_for(engine))
        runs = {name: _runner(q, engine, bits) for name, q in converted.items()}
    with clock("gate"):
        gate = GateSet(model, gate_audio, references, chunks=CHUNKS if settings.early_stop else 1)
        scores, leaders = _gate_observers(gate, runs, settings)
    chosen = leaders[-1]
    _record_gate(report, gate, scores, leaders, settings)
    qenc, figures = converted[chosen], scores[chosen]
    log.info("int8 (%s observers, %s engine): %s", chosen, engine, _summary(gate, figures))
    report["steps"] = [{"fp32_units": [], "increase": round(gate.increase(figures), 6), **public(figures)}]
    report["sensitivity"] = []
    kept: list[int] = []
    passed = gate.increase(figures) <= settings.max_wer_increase
    with clock("fallback"):
        if not passed:
            qenc, figures, kept, passed = _keep_units_in_fp32(
                model, qenc, figures, gate, settings, report, lambda q: _runner(q, engine, bits), engine
            )
    report["gate"].update(
        utterances=len(gate.ids),
        seconds=round(gate.seconds, 2),
        fp32=gate.fp32_figures,
        int8=public(figures),
        increase=round(gate.increase(figures), 6),
        passed=passed,
    )
    report["fp32_units"] = [qenc.unit_names()[u] for u in kept] if passed else []
    if not passed:
        report["seconds"], report["phase_seconds"] = clock.total(), clock.phases
        raise GateFailed(_failure_message(report, settings), QuantizationReport.from_dict(report))
    with clock("self_check"):
        art = _artifact(model, qenc, kept, chosen, engine, bits, gate, report)
        _check_reproduced(art, engine, bits)
    report["size_mb"] = {
        "fp32": round(_nbytes(model.state_dict()) / 1e6, 2),
        "int8": round((_nbytes(art.int8) + _nbytes(art.features)) / 1e6, 2),
    }
    report["seconds"], report["phase_seconds"] = clock.total(), clock.phases
    art.report = QuantizationReport.from_dict(report)  # complete now: typed from here on
    return art


def _start_report(
    model: LeanModel,
    calibration: Sequence[np.ndarray],
    gate_audio: Sequence[np.ndarray],
    settings: Settings,
    info: dict | None,
) -> dict:
    rate = model.spec.features.sample_rate
    report: dict = {"recipe_version": RECIPE_VERSION, **(info or {}), "settings": asdict(settings)}
    report["calibration"] = {
        **report.get("calibration", {}),
        "utterances": len(calibration),
        "seconds": round(sum(len(a) for a in calibration) / rate, 2),
    }
    log.info(
        "calibrating on %d utterances (%.0f s), gate on up to %d held-out utterances (%.0f s)",
        len(calibration),
        report["calibration"]["seconds"],
        len(gate_audio),
        sum(len(a) for a in gate_audio) / rate,
    )
    return report


def _calibrated(model: LeanModel, calibration: Sequence[np.ndarray], observers: Sequence[str]):
    """The observed model after one pass over the calibration audio (every candidate observer at once)."""
    observed = prepare(model, "all" if len(observers) > 1 else observers[0])
    calibrate(observed, [(f, n) for f, n, _ in feature_batches(model, calibration)])
    return observed


def _converted(observed, observers: Sequence[str], engine: str) -> dict:
    """Each candidate observer's int8 model, packed for `engine` (calibrated at 8 bits)."""
    converted = {}
    for observer in observers:
        if len(observers) > 1:
            use_observer(observed, observer)
        converted[observer] = convert(observed, engine)
    return converted


def _runner(qenc, engine: str, bits: int):
    """callable(feats, frames) running `qenc` as a worker with `bits`-bit activations on `engine` would."""
    variant = rebuild(qenc, engine, bits)

    def run(feats, frames):
        with engine_scope(engine):
            return variant(feats, frames)

    run.reader = int8_reader(variant, engine)  # a transducer's texts come from its int8 prediction network
    return run


def _record_gate(report: dict, gate: GateSet, scores: dict, leaders: list[str], settings: Settings) -> None:
    report["observers"] = {name: public(fig) for name, fig in scores.items()}
    report["observer"] = leaders[-1]
    report["gate"] = {
        **report.get("gate", {}),
        "mode": "references" if gate.references else "agreement with fp32",
        "max_wer_increase": settings.max_wer_increase,
        "planned_utterances": len(gate.audios),
        "planned_seconds": round(gate.planned_seconds, 2),
        "chunks_read": gate.read,
        "chunks": len(gate.chunks),
        "leaders": leaders,
    }


def _failure_message(report: dict, settings: Settings) -> str:
    return (
        f"int8 accuracy is outside the tolerance: {gate_description(report['gate'])}; tried keeping "
        f"{min(settings.max_fp32_layers, len(report['sensitivity']))} most sensitive layer(s) in fp32. "
        "Raise quantization.max_wer_increase or max_fp32_layers, calibrate on more or more typical audio, "
        "or run with precision fp32"
    )


def _artifact(
    model: LeanModel, qenc, kept: list[int], observer: str, engine: str, bits: int, gate: GateSet, report: dict
) -> Artifact:
    """The artifact workers load: int8 weights, the fp32 front end, the units kept in fp32, the recipe and
    the self-check reference (recorded in `report`); `quantize_model` sets the report once it is complete."""
    reference = _self_check_reference(model, qenc, engine, bits, gate)
    report["self_check"] = {
        "utterances": len(reference["frames"]),
        "seconds": reference["seconds"],
        "expected": reference["expected"],
    }
    recipe = {
        "observer": observer,
        "weights": "qint8 per-channel symmetric",
        "activations": "quint8 per-tensor affine, calibrated on 8 bits; 7 bits over the same "
        "ranges on CPUs whose int8 kernels saturate",
        **getattr(qenc, "recipe", {}),
        "version": RECIPE_VERSION,
    }
    return Artifact(
        model.spec, model.features.state_dict(), qenc.state_dict(), sorted(kept), recipe=recipe, reference=reference
    )


def _best(scores: dict, gate: GateSet, settings: Settings) -> str:
    """Best = passes the gate, then closest to fp32 (agreement of transcripts, then logits): with a few
    hundred held-out words, a WER *below* fp32's is luck, not a better observer."""
    return min(
        scores,
        key=lambda n: (
            gate.increase(scores[n]) > settings.max_wer_increase,
            scores[n]["wer_vs_fp32"],
            scores[n]["logit_error"],
        ),
    )


def _gate_observers(gate: GateSet, runs: dict, settings: Settings) -> tuple[dict, list[str]]:
    """Every candidate scored chunk by chunk; the gate stops reading once the same candidate has led after
    `MIN_CHUNKS` or more chunks and its pass is clear (`GateSet.clear_pass`). Returns the scores and the
    leader after each chunk read (the last one is the choice)."""
    leaders: list[str] = []
    while True:
        scores = {name: gate.score(run, key=name) for name, run in runs.items()}
        leaders.append(_best(scores, gate, settings))
        if gate.complete:
            return scores, leaders
        if (
            gate.read >= MIN_CHUNKS
            and len(set(leaders)) == 1
            and gate.clear_pass(scores[leaders[-1]], settings.max_wer_increase)
        ):
            return scores, leaders
        if gate.increase(scores[leaders[-1]]) > settings.max_wer_increase:
            gate.read_all()  # a failing gate goes on to keep units in fp32: that decision reads every chunk
        else:
            gate.read_more()


def _keep_units_in_fp32(
    model, qenc, figures, gate: GateSet, settings: Settings, report: dict, run_on_engine, engine: str
):
    """Per-unit sensitivity (logit error with that unit alone in fp32), then the most sensitive units go
    back to fp32 one by one until the gate passes or `max_fp32_layers` is reached."""
    units, steps = qenc.unit_names(), report["steps"]
    kept: list[int] = []
    if settings.max_fp32_layers <= 0 or not fallback_possible(model.spec):
        return qenc, figures, kept, False
    gate.read_all()
    sensitivity = {
        k: gate.score(run_on_engine(with_float_units(qenc, model, [k], engine)))["logit_error"]
        for k in range(len(units))
    }
    ranked = sorted(sensitivity, key=sensitivity.get)  # lowest error with k in fp32 = most sensitive
    report["sensitivity"] = [
        {
            "unit": units[k],
            "logit_error_with_unit_in_fp32": sensitivity[k],
            "logit_error_all_int8": figures["logit_error"],
        }
        for k in ranked
    ]
    for k in ranked[: settings.max_fp32_layers]:
        kept.append(k)
        hybrid = with_float_units(qenc, model, kept, engine)
        figures = gate.score(run_on_engine(hybrid))
        steps.append(
            {"fp32_units": [units[u] for u in kept], "increase": round(gate.increase(figures), 6), **public(figures)}
        )
        log.info("keeping %s in fp32: %s", ", ".join(units[u] for u in kept), _summary(gate, figures))
        if gate.increase(figures) <= settings.max_wer_increase:
            return hybrid, figures, kept, True
    return qenc, figures, kept, False


def _self_check_reference(model: LeanModel, qenc, engine: str, bits: int, gate: GateSet) -> dict:
    """The fp32 reference every worker checks its int8 model against, with what the gated int8 model
    reaches on it here at `bits` and, where this CPU can run it unsaturated, at 7 bits too. Its audio
    and fp32 logits are the gate's own (`GateSet.reference`): nothing is computed twice."""
    reference = gate.reference(REFERENCE_ITEMS, REFERENCE_SECONDS)
    for b in sorted({bits, 7}, reverse=True):
        variant = Int8Model(model.spec, model.features, rebuild(qenc, engine, b), engine)
        reference["expected"][b] = measure(variant.logits, reference, variant.reader)
    return reference


def _check_reproduced(art: Artifact, engine: str, bits: int) -> None:
    """What a worker will do: rebuild from the artifact's contents alone (what its bytes hold: torch.save
    round-trips them exactly) on the gate's engine and pass its self-check with the very figures the gated
    model reached on the reference."""
    loaded = build_int8_model(art, engine)
    got, want = loaded.int8_check, art.reference["expected"][bits]
    if (
        got["fallback"]
        or got["wer_vs_fp32"] != want["wer_vs_fp32"]
        or abs(got["logit_error"] - want["logit_error"]) > 1e-5 + 0.01 * want["logit_error"]
    ):
        raise QuantizationError(
            f"the int8 artifact does not reproduce the gated model (logit error "
            f"{got['logit_error']} vs {want['logit_error']}, self-check {got}); please report this"
        )


class _Phases:
    """Seconds spent per phase of `quantize_model` (in the report: where first-time quantization goes)."""

    def __init__(self):
        self.start = time.perf_counter()
        self.phases: dict[str, float] = {}

    @contextmanager
    def __call__(self, name: str):
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.phases[name] = round(self.phases.get(name, 0.0) + time.perf_counter() - t0, 3)

    def total(self) -> float:
        return round(time.perf_counter() - self.start, 2)


def _cpu() -> dict:
    info = cpu_info()
    return {"model": info["model"], "flags": int8_flags()}


def _nbytes(state: dict) -> int:
    return sum(t.numel() * t.element_size() for t in state.values() if isinstance(t, torch.Tensor))


def _summary(gate: GateSet, figures: dict) -> str:
    text = f"WER vs fp32 transcripts {100 * figures['wer_vs_fp32']:.2f}%, logit cosine {figures['logit_cosine']:.4f}"
    if "wer" in figures:
        text += f", WER {100 * figures['wer']:.2f}% (fp32 {100 * gate.fp32_figures['wer']:.2f}%)"
    return text


def gate_description(gate: dict) -> str:
    what = "WER increase over fp32" if gate["mode"] == "references" else "WER of int8 against fp32 transcripts"
    return f"{what} {100 * gate['increase']:.2f} points (limit {100 * gate['max_wer_increase']:.2f})"
