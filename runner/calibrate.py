"""Driver side of int8: sample audio, calibrate, choose observers, gate accuracy, make the artifact.

    samples (seeded, calibration kept apart from the gate's held-out items; files longer than
             `max_seconds` take part as consecutive windows of that length)
    -> per activation observer: prepare -> calibrate -> convert          (runner.quantize)
    -> held-out gate: int8 vs fp32 (WER/CER with references, else agreement with fp32
       transcripts), plus logit similarity; the observer with the best figures is kept
    -> over the tolerance: per-unit sensitivity (logit error with that unit kept in fp32),
       then the most sensitive units go back to fp32 one by one until the gate passes, or
       `max_fp32_layers` is reached and quantization fails with the report (exit 1)
    -> Artifact (runner.artifact), cached on disk by what it was made from: model, manifests,
       settings, the sampled audio files and the quantization code (runner.int8_cache).

Runs where the fp32 model already is (the job driver, `asr-runner quantize`). No Ray here.
"""

from __future__ import annotations

import logging
import math
import os
import random
import stat
import time
from dataclasses import asdict, dataclass, replace
from typing import Callable, Iterator, Optional, Sequence

import numpy as np
import torch

from . import int8_cache
from .artifact import Artifact
from .audio import load_audio
from .errors import AudioLoadError, InputError, QuantizationError
from .int8_cache import cache_dir, code_version, fp32_checkpoint  # noqa: F401 - public here too
from .int8_check import logit_figures, make_reference, measure, summarize, texts
from .manifest import ManifestItem, file_sha256, iter_manifest
from .metrics import cer, normalize_text, wer
from .model import LeanCTCModel
from .transcribe import pad_batch

log = logging.getLogger(__name__)

RECIPE_VERSION = 3  # bump when the recipe changes what an artifact holds: invalidates the cache
# (2: Conformer static int8; 3: activation bits per CPU, the self-check reference)


class GateFailed(QuantizationError):
    """int8 accuracy stayed outside the tolerance even with `max_fp32_layers` units in fp32."""

    def __init__(self, message: str, report: dict):
        super().__init__(message)
        self.report = report


@dataclass(frozen=True)
class Settings:
    calibration_items: int = 100
    gate_items: int = 100
    max_wer_increase: float = 0.005  # a fraction: 0.005 = 0.5 WER points
    max_fp32_layers: int = 3  # units (encoder blocks, decoder) the gate may keep in fp32
    engine: str = "auto"  # engine the gate evaluates with (auto: the fastest here)
    observers: tuple[str, ...] = ("histogram", "minmax", "moving_average")
    seed: int = 0
    max_seconds: float = 30.0  # items longer than this take part as consecutive windows of this length


# --------------------------------------------------------------------------- samples
@dataclass
class Samples:
    calibration: list[ManifestItem]  # candidates in sampled order, with spares for unreadable items
    gate: list[ManifestItem]
    calibration_items: int  # how many of each to use
    gate_items: int


MIN_WINDOW = 2.0  # seconds: the last window of a long item is left out when shorter than this


def _with_spares(k: int) -> int:
    return k + k // 10 + 5


def draw_samples(manifest: str, calibration_manifest: Optional[str], settings: Settings) -> Samples:
    """Reproducible samples (seeded reservoir, one streaming pass): calibration and gate never share audio.

    Without a separate calibration manifest both come from `manifest`, disjoint. An item longer than
    `max_seconds` is offered as its consecutive windows of that length (`_windows`), so the sample is
    uniform over stretches of audio: windows of one long file may land in both samples, never the same
    window. Each sample carries spares, used in order when an item cannot be read.
    """
    want_cal, want_gate = settings.calibration_items, settings.gate_items
    if calibration_manifest is None:
        both = _reservoir(manifest, _with_spares(want_cal + want_gate), settings)
        if len(both) < 2:
            raise InputError(f"{manifest}: int8 calibration needs at least 2 readable items (one to calibrate, "
                             "one to check accuracy); the manifest has fewer")
        # Gate candidates first, the rest calibrate; spares (and a small manifest) split in proportion.
        n_gate = min(len(both) - 1, max(1, len(both) * want_gate // (want_cal + want_gate)))
        calibration, gate = _apart(both[n_gate:], both[:n_gate], settings.max_seconds), both[:n_gate]
        if not calibration:
            raise InputError(f"{manifest}: every item to calibrate on has audio the accuracy check also uses "
                             "(the same file listed more than once?)")
        return Samples(calibration, gate, want_cal, want_gate)
    calibration = _reservoir(calibration_manifest, _with_spares(want_cal), settings)
    gate = _apart(_reservoir(manifest, _with_spares(want_gate), settings, salt=1), calibration, settings.max_seconds)
    if not calibration or not gate:
        empty = calibration_manifest if not calibration else manifest
        raise InputError(f"{empty}: no items to {'calibrate on' if not calibration else 'check accuracy on'}")
    return Samples(calibration, gate, want_cal, want_gate)


def _reservoir(path: str, k: int, settings: Settings, salt: int = 0) -> list[ManifestItem]:
    """k items drawn uniformly from the short items and the long items' windows of `path`, in O(k) memory."""
    rng = random.Random(f"{settings.seed}:{salt}")
    picked: list[ManifestItem] = []
    seen = 0
    for item in iter_manifest(path):
        for unit in _windows(item, settings.max_seconds):
            seen += 1
            _offer(picked, unit, seen, k, rng)
    picked.sort(key=lambda i: (i.line, i.offset))
    random.Random(f"{settings.seed}:{salt}:order").shuffle(picked)
    return picked


def _windows(item: ManifestItem, max_seconds: float) -> Iterator[ManifestItem]:
    """`item` when it lasts at most `max_seconds` (or its length is unknown), else its consecutive windows
    of `max_seconds` (the last one kept when it lasts at least `MIN_WINDOW`), id `id@start s`, with no
    reference text: the manifest's belongs to the whole item, so a gate with windows measures agreement."""
    if item.duration is None or item.duration <= max_seconds or max_seconds <= 0:
        yield item
        return
    k = 0
    while (length := min(max_seconds, item.duration - k * max_seconds)) >= min(MIN_WINDOW, max_seconds):
        start = item.offset + k * max_seconds
        yield replace(item, id=f"{item.id}@{start:.1f}s", offset=start, duration=float(length), text=None)
        k += 1


def _offer(pool: list, item, seen: int, k: int, rng: random.Random) -> None:
    if len(pool) < k:
        pool.append(item)
    else:
        j = rng.randrange(seen)
        if j < k:
            pool[j] = item


def _apart(items: Sequence[ManifestItem], taken: Sequence[ManifestItem], max_seconds: float) -> list[ManifestItem]:
    """`items` less those whose audio (what `read_items` reads) overlaps audio of `taken` in the same file."""
    spans: dict[str, list[tuple[float, float]]] = {}
    for i in taken:
        spans.setdefault(i.audio_filepath, []).append(_span(i, max_seconds))
    return [i for i in items if not any(a < end and start < b for start, end in spans.get(i.audio_filepath, ())
                                        for a, b in [_span(i, max_seconds)])]


def _span(item: ManifestItem, max_seconds: float) -> tuple[float, float]:
    length = item.duration if item.duration else math.inf  # none or 0: to the end of the file
    return item.offset, item.offset + min(length, max_seconds)


def read_items(items: Sequence[ManifestItem], rate: int, max_seconds: float,
               limit: Optional[int] = None) -> tuple[list[np.ndarray], list[ManifestItem], list[str]]:
    """Audio of the first `limit` readable items (cut to `max_seconds`); the items kept; reasons for the skipped ones.

    A path that is not a regular file (a FIFO, a device, a folder) is skipped without being opened."""
    audios, kept, skipped = [], [], []
    for item in items:
        if limit is not None and len(kept) >= limit:
            break
        try:
            if not stat.S_ISREG(os.stat(item.audio_filepath).st_mode):
                skipped.append(f"id {item.id}: {item.audio_filepath}: not a regular file")
                continue
        except OSError:
            pass  # load_audio says what is wrong with it
        try:
            audio = load_audio(item.audio_filepath, rate, item.offset, item.duration)
        except AudioLoadError as exc:
            skipped.append(f"id {item.id}: {exc}")
            continue
        if len(audio) < 400:
            skipped.append(f"id {item.id}: shorter than one analysis window")
            continue
        audios.append(audio[: int(max_seconds * rate)])
        kept.append(item)
    return audios, kept, skipped


# --------------------------------------------------------------------------- measuring
def feature_batches(model: LeanCTCModel, audios: Sequence[np.ndarray], batch_size: int = 8):
    """(features, frames, indices) batches, sorted by length: the batching the workers use."""
    order = sorted(range(len(audios)), key=lambda i: len(audios[i]))
    out = []
    with torch.inference_mode():
        for start in range(0, len(order), batch_size):
            ids = order[start: start + batch_size]
            feats, frames = model.features(*pad_batch([audios[i] for i in ids]))
            out.append((feats, frames, ids))
    return out


class GateSet:
    """Held-out utterances with the fp32 model's logits and transcripts, to score int8 variants against."""

    def __init__(self, model: LeanCTCModel, audios: Sequence[np.ndarray], references: Optional[list[str]]):
        self.text_decoder = model.text_decoder
        self.batches = feature_batches(model, audios)
        self.references = [normalize_text(r) for r in references] if references else None
        self.seconds = sum(len(a) for a in audios) / model.spec.features.sample_rate
        with torch.inference_mode():
            self.fp32 = [model.logits(f, n) for f, n, _ in self.batches]
        self.fp32_texts = self._texts(self.fp32)
        self.fp32_figures = self._error_rates(self.fp32_texts)

    def _texts(self, outputs) -> list[str]:
        found = [""] * sum(len(ids) for *_, ids in self.batches)
        for (logits, lens), (*_, ids) in zip(outputs, self.batches):
            for i, text in zip(ids, texts(logits, lens, self.text_decoder)):
                found[i] = text
        return found

    def _error_rates(self, texts: list[str]) -> dict:
        if self.references is None:
            return {}
        return {"wer": wer(self.references, texts), "cer": cer(self.references, texts)}

    @torch.inference_mode()
    def score(self, run: Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]) -> dict:
        """Figures of a model variant: agreement with fp32 transcripts, logit similarity, WER/CER."""
        outputs = [run(f, n) for f, n, _ in self.batches]
        figures = summarize([logit_figures(a, b, lens) for (a, lens), (b, _) in zip(outputs, self.fp32)])
        found = self._texts(outputs)
        figures["wer_vs_fp32"] = wer(self.fp32_texts, found)
        figures.update(self._error_rates(found))
        return {k: round(v, 6) for k, v in figures.items()}

    def increase(self, figures: dict) -> float:
        """What the gate compares with `max_wer_increase`: WER increase over fp32 with references,
        else the WER of int8 against the fp32 transcripts (an upper bound on the increase)."""
        if self.references is not None:
            return figures["wer"] - self.fp32_figures["wer"]
        return figures["wer_vs_fp32"]


# --------------------------------------------------------------------------- quantizing
def quantize_model(model: LeanCTCModel, calibration: Sequence[np.ndarray], gate_audio: Sequence[np.ndarray],
                   references: Optional[list[str]], settings: Settings = Settings(),
                   info: Optional[dict] = None) -> Artifact:
    """Calibrated, gated int8 artifact of `model`; raises `GateFailed` (with the report) if int8 is not accurate enough."""
    from .artifact import build_int8_model
    from .quantize import (activation_bits, candidate_engines, check_engine, choose_engine, convert, fallback_possible,
                           load_int8, prepare, calibrate, probe_frames, rebuild, time_engines, with_float_units)

    t_start = time.perf_counter()
    spec = model.spec
    rate = spec.features.sample_rate
    report: dict = {"recipe_version": RECIPE_VERSION, **(info or {}), "settings": asdict(settings)}
    report["calibration"] = {**report.get("calibration", {}), "utterances": len(calibration),
                             "seconds": round(sum(len(a) for a in calibration) / rate, 2)}
    cal_batches = [(f, n) for f, n, _ in feature_batches(model, calibration)]
    gate = GateSet(model, gate_audio, references)
    report["gate"] = {**report.get("gate", {}), "utterances": len(gate_audio), "seconds": round(gate.seconds, 2),
                      "mode": "references" if references else "agreement with fp32",
                      "max_wer_increase": settings.max_wer_increase, "fp32": gate.fp32_figures}
    log.info("calibrating on %d utterances (%.0f s), gate on %d held-out utterances (%.0f s)",
             len(calibration), report["calibration"]["seconds"], len(gate_audio), gate.seconds)

    converted, engine = {}, settings.engine
    for observer in settings.observers:
        observed = prepare(model, observer)
        calibrate(observed, cal_batches)
        if engine == "auto":  # the gate evaluates on the engine that is fastest here
            first = convert(observed, "onednn" if "onednn" in candidate_engines() else candidate_engines()[0])
            timings = time_engines(lambda e: load_int8(spec, first.state_dict(), e), spec.encoder.feat_in,
                                   candidate_engines(), spec.features.sample_rate / spec.features.hop_length,
                                   frames=probe_frames(spec))
            engine = choose_engine(timings)
            report["engine_seconds_per_audio_second"] = {k: round(v, 5) for k, v in timings.items()}
        else:
            try:
                check_engine(engine)
            except ValueError as exc:
                raise InputError(str(exc)) from None
        converted[observer] = convert(observed, engine)
    bits = activation_bits(engine)  # the same rule as every worker's, on this CPU
    report.update(engine=engine, activation_bits=bits, cpu=_cpu())

    def run_on_engine(qenc):
        from .quantize import engine_scope

        variant = rebuild(qenc, engine, bits)

        def run(feats, frames):
            with engine_scope(engine):
                return variant(feats, frames)
        return run

    scores = {name: gate.score(run_on_engine(q)) for name, q in converted.items()}
    report["observers"] = scores
    # Best = passes the gate, then closest to fp32 (agreement of transcripts, then logits): with a few
    # hundred held-out words, a WER *below* fp32's is luck, not a better observer.
    chosen = min(scores, key=lambda n: (gate.increase(scores[n]) > settings.max_wer_increase,
                                        scores[n]["wer_vs_fp32"], scores[n]["logit_error"]))
    report["observer"] = chosen
    qenc, figures = converted[chosen], scores[chosen]
    units = qenc.unit_names()
    steps = [{"fp32_units": [], "increase": round(gate.increase(figures), 6), **figures}]
    log.info("int8 (%s observers, %s engine): %s", chosen, engine, _summary(gate, figures))

    passed = gate.increase(figures) <= settings.max_wer_increase
    kept: list[int] = []
    report["sensitivity"] = []
    if not passed and settings.max_fp32_layers > 0 and fallback_possible(spec):
        sensitivity = {k: gate.score(run_on_engine(with_float_units(qenc, model, [k], engine)))["logit_error"]
                       for k in range(len(units))}
        ranked = sorted(sensitivity, key=sensitivity.get)  # lowest error with k in fp32 = most sensitive
        report["sensitivity"] = [{"unit": units[k], "logit_error_with_unit_in_fp32": sensitivity[k],
                                  "logit_error_all_int8": figures["logit_error"]} for k in ranked]
        for k in ranked[: settings.max_fp32_layers]:
            kept.append(k)
            hybrid = with_float_units(qenc, model, kept, engine)
            figures = gate.score(run_on_engine(hybrid))
            steps.append({"fp32_units": [units[u] for u in kept], "increase": round(gate.increase(figures), 6), **figures})
            log.info("keeping %s in fp32: %s", ", ".join(units[u] for u in kept), _summary(gate, figures))
            if gate.increase(figures) <= settings.max_wer_increase:
                passed, qenc = True, hybrid
                break
    report["steps"] = steps
    report["fp32_units"] = [units[u] for u in kept] if passed else []
    report["gate"].update(int8=figures, increase=round(gate.increase(figures), 6), passed=passed)
    report["seconds"] = round(time.perf_counter() - t_start, 2)
    if not passed:
        raise GateFailed(
            f"int8 accuracy is outside the tolerance: {gate_description(report['gate'])}; tried keeping "
            f"{min(settings.max_fp32_layers, len(report['sensitivity']))} most sensitive layer(s) in fp32. "
            "Raise quantization.max_wer_increase or max_fp32_layers, calibrate on more or more typical audio, "
            "or run with precision fp32", report)
    reference = _self_check_reference(model, qenc, engine, bits, gate_audio)
    report["self_check"] = {"utterances": len(reference["frames"]), "seconds": reference["seconds"],
                            "expected": reference["expected"]}
    art = Artifact(spec, model.features.state_dict(), qenc.state_dict(), sorted(kept),
                   recipe={"observer": chosen, "weights": "qint8 per-channel symmetric",
                           "activations": "quint8 per-tensor affine, calibrated on 8 bits; 7 bits over the same "
                                          "ranges on CPUs whose int8 kernels saturate", **getattr(qenc, "recipe", {}),
                           "version": RECIPE_VERSION},
                   report=report, reference=reference)
    # What a worker will do: rebuild from bytes alone, on the gate's engine, pass its self-check and get the
    # same logits.
    loaded = build_int8_model(art.to_bytes(), engine)
    check = gate.score(loaded.model.logits)
    if loaded.int8_check["fallback"] or check["wer_vs_fp32"] != figures["wer_vs_fp32"] or \
            abs(check["logit_error"] - figures["logit_error"]) > 1e-5 + 0.01 * figures["logit_error"]:
        raise QuantizationError(f"the int8 artifact does not reproduce the gated model (logit error "
                                f"{check['logit_error']} vs {figures['logit_error']}, self-check "
                                f"{loaded.int8_check}); please report this")
    report["size_mb"] = {"fp32": round(_nbytes(model.state_dict()) / 1e6, 2), "artifact": round(len(art.to_bytes()) / 1e6, 2)}
    return art


def _self_check_reference(model: LeanCTCModel, qenc, engine: str, bits: int, gate_audio) -> dict:
    """The fp32 reference every worker checks its int8 model against, with what the gated int8 model
    reaches on it here at `bits` and, where this CPU can run it unsaturated, at 7 bits too."""
    from .quantize import Int8CTCModel, rebuild

    reference = make_reference(model, gate_audio)
    for b in sorted({bits, 7}, reverse=True):
        variant = Int8CTCModel(model.spec, model.features, rebuild(qenc, engine, b), engine)
        reference["expected"][b] = measure(variant.logits, reference, model.text_decoder)
    return reference


def _cpu() -> dict:
    from .sysinfo import cpu_info, int8_flags

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


# --------------------------------------------------------------------------- from files, with a cache
def cache_key(model_path: str, manifest: str, calibration_manifest: Optional[str], settings: Settings,
              samples: Optional[Samples] = None) -> str:
    """The key of the artifact these inputs make (draws the samples when not given)."""
    return artifact_inputs(model_path, manifest, calibration_manifest, settings, samples)["cache_key"]


def artifact_inputs(model_path: str, manifest: str, calibration_manifest: Optional[str], settings: Settings,
                    samples: Optional[Samples] = None, model_sha256: Optional[str] = None) -> dict:
    """What the artifact is made from, with its cache key (`runner.int8_cache.inputs_record`)."""
    samples = samples or draw_samples(manifest, calibration_manifest, settings)
    manifests = {"manifest": file_sha256(manifest),
                 "calibration": file_sha256(calibration_manifest) if calibration_manifest else None}
    return int8_cache.inputs_record(model_sha256 or file_sha256(model_path), manifests, asdict(settings),
                                    RECIPE_VERSION, samples.calibration, samples.gate)


def make_artifact(model_path: str, manifest: str, calibration_manifest: Optional[str] = None,
                  settings: Settings = Settings(), use_cache: bool = True) -> tuple[bytes, bool]:
    """Artifact bytes for a model and manifest, from the cache when the same inputs made one before.

    The samples are drawn first: the key covers the audio they read. A cached artifact is used only if
    its own record of its inputs matches. Returns (bytes, came_from_cache). Raises `GateFailed` (exit 1)
    or `InputError` (exit 2).
    """
    samples = draw_samples(manifest, calibration_manifest, settings)
    model_sha256 = file_sha256(model_path)
    inputs = artifact_inputs(model_path, manifest, calibration_manifest, settings, samples, model_sha256)
    if use_cache and (data := int8_cache.cached_artifact(inputs)) is not None:
        return data, True
    from .nemo_loader import load_any

    model = load_any(model_path)
    if use_cache:
        int8_cache.save_fp32_checkpoint(model, int8_cache.fp32_cache_path(model_path, model_sha256))
    rate = model.spec.features.sample_rate
    cal_audio, cal_items, cal_skipped = read_items(samples.calibration, rate, settings.max_seconds,
                                                   samples.calibration_items)
    gate_audio, gate_items, gate_skipped = read_items(samples.gate, rate, settings.max_seconds, samples.gate_items)
    if not cal_audio or not gate_audio:
        raise InputError(f"no readable audio to {'calibrate on' if not cal_audio else 'check accuracy on'} "
                         f"(skipped: {'; '.join((cal_skipped or gate_skipped)[:3])})")
    # References only when every gate item is a whole manifest item (windows have none) and none was cut.
    whole = all(len(a) < settings.max_seconds * rate for a in gate_audio)
    references = [i.text for i in gate_items] if whole and all(i.text is not None for i in gate_items) else None
    info = {"model": {"file": str(model_path), "sha256": model_sha256}, "inputs": inputs,
            "calibration": {"manifest": str(calibration_manifest or manifest), "skipped": cal_skipped[:20],
                            "ids": [i.id for i in cal_items][:1000]},
            "gate": {"manifest": str(manifest), "skipped": gate_skipped[:20], "ids": [i.id for i in gate_items][:1000]}}
    art = quantize_model(model, cal_audio, gate_audio, references, settings, info)
    data = art.to_bytes()
    if use_cache:
        int8_cache.store_artifact(data, inputs)
    return data, False
