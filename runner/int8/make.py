"""From files to an artifact, through the cache: draw the samples from the user's manifest(s), key the
artifact by everything it is made from (model bytes, manifests, the audio the samples read, settings,
recipe version, code), and quantize (`runner.int8.pipeline.quantize_model`) only when no cached artifact
made from the same inputs exists. What callers get back (`MadeArtifact`) carries the artifact's report,
so nobody parses the bytes again to read it."""

from __future__ import annotations

from dataclasses import asdict, dataclass

from runner.errors import InputError
from runner.inputs.manifest import file_sha256
from runner.int8 import cache as int8_cache
from runner.int8.artifact import sha256 as artifact_sha256
from runner.int8.config import Settings
from runner.int8.pipeline import RECIPE_VERSION, quantize_model
from runner.int8.report import QuantizationReport
from runner.int8.samples import Samples, draw_samples, read_items
from runner.model.nemo_loader import load_any


@dataclass(frozen=True)
class MadeArtifact:
    """What `make_artifact` hands the job and the command line: the artifact's bytes (what workers load),
    its quantization report (the record inside those bytes: calibration, gate, observers, engine, phases;
    see docs/int8.md) and whether it came from the cache."""

    data: bytes
    report: QuantizationReport
    from_cache: bool

    @property
    def sha256(self) -> str:
        return artifact_sha256(self.data)


def cache_key(
    model_path: str, manifest: str, calibration_manifest: str | None, settings: Settings, samples: Samples | None = None
) -> str:
    """The key of the artifact these inputs make (draws the samples when not given)."""
    return artifact_inputs(model_path, manifest, calibration_manifest, settings, samples)["cache_key"]


def artifact_inputs(
    model_path: str,
    manifest: str,
    calibration_manifest: str | None,
    settings: Settings,
    samples: Samples | None = None,
    model_sha256: str | None = None,
    decoder: str | None = None,
) -> dict:
    """What the artifact is made from, with its cache key (`runner.int8.cache.inputs_record`); `decoder`:
    a hybrid model's chosen head, part of the key when given."""
    samples = samples or draw_samples(manifest, calibration_manifest, settings)
    manifests = {
        "manifest": file_sha256(manifest),
        "calibration": file_sha256(calibration_manifest) if calibration_manifest else None,
    }
    return int8_cache.inputs_record(
        model_sha256 or file_sha256(model_path),
        manifests,
        {**asdict(settings), **({"decoder": decoder} if decoder else {})},
        RECIPE_VERSION,
        samples.calibration,
        samples.gate,
    )


def make_artifact(
    model_path: str,
    manifest: str,
    calibration_manifest: str | None = None,
    settings: Settings = Settings(),
    use_cache: bool = True,
    decoder: str | None = None,
) -> MadeArtifact:
    """The artifact for a model and manifest, from the cache when the same inputs made one before.

    The samples are drawn first: the key covers the audio they read. A cached artifact is used only if
    its own record of its inputs matches. Serialized once, its report handed back beside the bytes (no
    caller parses them again to read it). Raises `GateFailed` (exit 1)
    or `InputError` (exit 2).
    """
    samples = draw_samples(manifest, calibration_manifest, settings)
    model_sha256 = file_sha256(model_path)
    inputs = artifact_inputs(model_path, manifest, calibration_manifest, settings, samples, model_sha256, decoder)
    if use_cache and (cached := int8_cache.cached_artifact(inputs)) is not None:
        return MadeArtifact(*cached, from_cache=True)

    model = load_any(model_path, decoder)
    if use_cache:
        int8_cache.save_fp32_checkpoint(model, int8_cache.fp32_cache_path(model_path, model_sha256, decoder))
    rate = model.spec.features.sample_rate
    cal_audio, cal_items, cal_skipped = read_items(
        samples.calibration, rate, settings.max_seconds, samples.calibration_items
    )
    gate_audio, gate_items, gate_skipped = read_items(samples.gate, rate, settings.max_seconds, samples.gate_items)
    if not cal_audio or not gate_audio:
        raise InputError(
            f"no readable audio to {'calibrate on' if not cal_audio else 'check accuracy on'} "
            f"(skipped: {'; '.join((cal_skipped or gate_skipped)[:3])})"
        )
    # References only when every gate item is a whole manifest item (windows have none) and none was cut.
    whole = all(len(a) < settings.max_seconds * rate for a in gate_audio)
    references = [i.text for i in gate_items] if whole and all(i.text is not None for i in gate_items) else None
    info = {
        "model": {"file": str(model_path), "sha256": model_sha256},
        "inputs": inputs,
        "calibration": {
            "manifest": str(calibration_manifest or manifest),
            "skipped": cal_skipped[:20],
            "ids": [i.id for i in cal_items][:1000],
        },
        "gate": {"manifest": str(manifest), "skipped": gate_skipped[:20], "ids": [i.id for i in gate_items][:1000]},
    }
    art = quantize_model(model, cal_audio, gate_audio, references, settings, info)
    data = art.to_bytes()
    if use_cache:
        int8_cache.store_artifact(data, inputs)
    return MadeArtifact(data, art.report, from_cache=False)
