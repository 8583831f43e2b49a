"""int8 post-training static quantization: fusion, engines, the accuracy gate, the artifact, the CLI."""

import io
import json
from pathlib import Path

import pytest
import soundfile as sf
import torch

from runner.cli.main import main
from runner.int8.artifact import Artifact, build_int8_model, sha256
from runner.int8.config import Settings
from runner.int8.conv_family import fusion_groups, int8_structure
from runner.int8.engines import (
    activation_bits,
    available_engines,
    candidate_engines,
    choose_engine,
    engine_scope,
    time_engines,
)
from runner.int8.model import with_activation_bits
from runner.int8.pipeline import GateFailed, quantize_model
from runner.int8.report import QuantizationReport
from runner.metrics import wer
from runner.model.transcribe import DecodeOptions, transcribe_batch

from .support import (
    HEAVY,
    calibration_audio,
    copy_model,
    fresh_process_transcripts,
    held_out_gate,
    pad,
    pinned_engine,
    write_manifest,
)


@pytest.fixture(scope="module")
def calibration():
    """Calibration audio kept apart from the held-out sets (other sentences, other seed)."""
    return calibration_audio(40)


@pytest.fixture(scope="module")
def gate_set():
    """Held-out utterances for the gate: neither training, calibration nor the `speech` test set."""
    return held_out_gate(60)


@pytest.fixture(scope="module")
def artifact(tiny_lean, calibration, gate_set):
    """One engine, not `auto`: a timing probe must not decide which int8 arithmetic the tests see."""
    settings = Settings(engine=pinned_engine())
    return quantize_model(tiny_lean, calibration, [a for _, a in gate_set], [t for t, _ in gate_set], settings)


def make_outlier_channels(model, block: int, channels: slice = slice(0, 4)) -> None:
    """Same fp32 function, hostile to per-tensor int8: 1000x larger activations in a few channels of
    one block (BN scale up, the next pointwise conv's input weights down by the same factor)."""
    layers = model.encoder.blocks[block].mconv
    bn, next_pointwise = layers[2], layers[6].conv
    with torch.no_grad():
        bn.weight[channels] *= 1000
        bn.bias[channels] *= 1000
        next_pointwise.weight[:, channels, :] /= 1000


def test_fusion_covers_every_conv_bn_pair(tiny_lean):
    groups = fusion_groups(tiny_lean.encoder)
    bns = [n for n, m in tiny_lean.encoder.named_modules() if isinstance(m, torch.nn.BatchNorm1d)]
    assert sorted(f"encoder.{n}" for n in bns) == sorted(g[1] for g in groups)
    assert any(len(g) == 3 for g in groups)  # conv + bn + relu inside repeated sub-blocks


def test_gate_passes_and_reports(artifact):
    report = artifact.report
    gate = report["gate"]
    assert gate["passed"] and gate["mode"] == "references" and report["fp32_units"] == []
    assert gate["increase"] <= 0.005 and gate["int8"]["logit_cosine"] > 0.99
    assert set(report["observers"]) == {"histogram", "minmax", "moving_average"}
    assert report["observer"] in report["observers"]
    assert report["engine"] in available_engines() and report["activation_bits"] == activation_bits(report["engine"])
    assert artifact.recipe["weights"].startswith("qint8 per-channel")
    # Typed where it crosses modules; in the artifact's bytes the same plain JSON object as ever.
    assert isinstance(report, QuantizationReport) and report.passed and report.observer == report["observer"]
    raw = torch.load(io.BytesIO(artifact.to_bytes()), weights_only=True)["report"]
    assert type(raw) is dict and raw == report.to_dict() and json.loads(json.dumps(raw, default=str))
    again = QuantizationReport.from_dict(raw)
    assert again == report and list(again.to_dict()) == list(raw) and not again.extra


@pytest.mark.parametrize("engine", available_engines())
def test_int8_agrees_with_fp32_on_every_engine(tiny_lean, artifact, speech, engine):
    """Every engine this torch has runs the one engine-neutral artifact, qnnpack included."""
    loaded = build_int8_model(artifact.to_bytes(), engine)
    assert loaded.engine == engine
    audios = [a for _, a in speech]
    disagreement = wer(transcribe_batch(tiny_lean, audios), transcribe_batch(loaded.model, audios))
    bits = loaded.int8_check["activation_bits"]
    print(engine, f"{bits}-bit activations: WER of int8 against fp32 transcripts:", disagreement)
    # This 0.17 M-parameter model trained for 2 minutes has many near-tie words. It measures 1.5-3% with
    # 8-bit activations (VNNI machines) and, with the 7 bits of a CPU without VNNI, 4.1% on the modules (AMD
    # EPYC, AVX2), 4.5% on the modules and 6.2% on onednn's direct forward (the AVX2 kind emulated on a Zen 5
    # EPYC, docs/cpu-kinds.md). The direct forward's fused residual adds round once instead of twice: its
    # logits were as close to fp32 (cosine 0.99892 against the modules' 0.99891), other words flipped. The
    # <= 2% target is checked on the trained demo model (test_trained_demo_model_int8_agrees_with_fp32).
    assert disagreement <= (0.05 if bits == 8 else 0.08)


def test_artifact_round_trips_to_identical_outputs(artifact, speech):
    data = artifact.to_bytes()
    again = Artifact.from_bytes(data)
    assert again.spec == artifact.spec and again.float_units == artifact.float_units
    assert again.report == artifact.report and again.recipe == artifact.recipe
    assert again.int8.keys() == artifact.int8.keys()
    for key, tensor in artifact.int8.items():
        if isinstance(tensor, torch.Tensor):
            other = again.int8[key]
            assert (
                (
                    torch.equal(tensor.int_repr(), other.int_repr())
                    and torch.equal(tensor.q_per_channel_scales(), other.q_per_channel_scales())
                )
                if tensor.is_quantized and tensor.qscheme() == torch.per_channel_symmetric
                else torch.equal(tensor, other)
            ), key
    assert len(sha256(data)) == 64
    a, b = build_int8_model(data, "onednn").model, build_int8_model(again, "onednn").model
    audio = [s[1] for s in speech[:8]]
    with torch.inference_mode():
        assert torch.equal(a(*pad(audio))[0], b(*pad(audio))[0])
    assert all(t.dtype in (torch.qint8, torch.quint8) for k, t in artifact.int8.items() if k.endswith(".weight"))


@pytest.mark.skipif("onednn" not in available_engines(), reason="this torch build has no onednn engine")
def test_auto_takes_onednn_for_the_conv_family_without_probing(artifact):
    """fbgemm and x86 have no fast kernel for the conv family's long 1-D depthwise convs (7-100x slower
    than onednn on the three CPU kinds measured): `auto` does not time them. Conformers are probed
    (test_conformer.py)."""
    loaded = build_int8_model(artifact.to_bytes(), "auto")
    assert (loaded.engine, loaded.engine_choice, loaded.engine_seconds) == ("onednn", "preferred", {})
    assert loaded.int8_check["passed"] and loaded.int8_check["engine"] == "onednn"


def test_auto_breaks_near_ties_by_preference_not_by_noise():
    assert choose_engine({"qnnpack": 0.028, "onednn": 0.029}) == "onednn"  # seen on a loaded machine
    assert choose_engine({"qnnpack": 0.020, "onednn": 0.029}) == "qnnpack"  # a real lead still wins
    assert choose_engine({"fbgemm": 0.0100, "x86": 0.0104, "onednn": 0.0200}) == "x86"


def test_auto_candidates_leave_qnnpack_as_fallback(artifact, monkeypatch):
    import runner.int8.engines as quantize

    assert candidate_engines() == [e for e in available_engines() if e != "qnnpack"]
    conv = artifact.spec
    assert candidate_engines(conv) == (["onednn"] if "onednn" in available_engines() else candidate_engines())
    monkeypatch.setattr(quantize, "available_engines", lambda: ["x86", "fbgemm", "qnnpack"])  # no onednn
    assert candidate_engines(conv) == ["x86", "fbgemm"]  # then they are timed
    monkeypatch.setattr(quantize, "available_engines", lambda: ["qnnpack"])  # an ARM-like build
    assert candidate_engines() == candidate_engines(conv) == ["qnnpack"]


def test_activation_bits_follow_the_cpu_flags(monkeypatch):
    import platform

    monkeypatch.setattr(platform, "machine", lambda: "x86_64")
    for engine in ("onednn", "x86", "fbgemm"):
        assert activation_bits(engine, ["avx2", "fma"]) == 7  # vpmaddubsw: int16 with saturation
        assert activation_bits(engine, ["avx2", "avx512f", "avx512bw"]) == 7  # AVX-512 without VNNI too
        assert activation_bits(engine, ["avx2", "avx512_vnni"]) == 8
        assert activation_bits(engine, ["avx2", "avx_vnni"]) == 8
        assert activation_bits(engine, ["amx_int8"]) == 8
    assert activation_bits("qnnpack", ["avx2"]) == 8  # int32 accumulation
    monkeypatch.setenv("ASR_RUNNER_CPU_FLAGS", "avx2,avx512_vnni")  # the diagnostic override
    assert activation_bits("onednn") == 8
    monkeypatch.setenv("ASR_RUNNER_CPU_FLAGS", "avx2 fma")
    assert activation_bits("onednn") == 7


def test_seven_bit_activations_keep_the_calibrated_ranges(artifact):
    state = artifact.int8
    seven = with_activation_bits(state, 7, keep={"decoder.scale"})
    scales = [
        k
        for k in state
        if k.endswith("scale")
        and isinstance(state[k], torch.Tensor)
        and not state[k].is_quantized
        and k != "decoder.scale"
    ]
    assert len(scales) > 10 and "in_scale" in scales and "quant.scale" in scales
    for key in scales:
        zp_key = key[: -len("scale")] + "zero_point"
        s8, z8, s7, z7 = (t.double() for t in (state[key], state[zp_key], seven[key], seven[zp_key]))
        assert torch.all((z7 >= 0) & (z7 <= 127)), key
        low8, high8, low7, high7 = -z8 * s8, (255 - z8) * s8, -z7 * s7, (127 - z7) * s7
        step = s7.max()
        assert torch.allclose(low7, low8, atol=float(step)) and torch.allclose(high7, high8, atol=float(step)), key
    assert torch.equal(seven["decoder.scale"], state["decoder.scale"])  # the logits: only dequantized
    for key, tensor in state.items():  # int8 weights are untouched
        if isinstance(tensor, torch.Tensor) and tensor.is_quantized:
            assert seven[key] is tensor


def test_int8_transcript_does_not_depend_on_batch(artifact, speech):
    model = build_int8_model(artifact.to_bytes(), "onednn").model
    audios = [a for _, a in speech[:12]]
    batched = transcribe_batch(model, audios, DecodeOptions(batch_size=12))
    alone = [transcribe_batch(model, [a], DecodeOptions(batch_size=1))[0] for a in audios]
    assert batched == alone


def test_int8_structure_runs_convs_in_int8(artifact):
    with engine_scope("onednn"):
        kinds = {type(m).__name__ for m in int8_structure(artifact.spec).modules()}
    assert {"ConvReLU1d", "Conv1d", "Quantize", "DeQuantize", "QFunctional"} <= kinds
    assert "BatchNorm1d" not in kinds


def test_worker_loads_the_artifact_in_a_fresh_process_without_nemo(artifact, speech_files, tmp_path):
    wavs = [p for _, p in speech_files[:6]]
    out, stderr = fresh_process_transcripts(artifact, wavs, "auto", tmp_path)
    assert not HEAVY & set(out["modules"])
    here = build_int8_model(artifact.to_bytes(), out["engine"]).model
    assert out["texts"] == transcribe_batch(here, [sf.read(p, dtype="float32")[0] for p in wavs])
    assert "Warning" not in stderr and "deprecat" not in stderr.lower()


def test_gate_keeps_the_sensitive_block_in_fp32(tiny_lean, calibration, gate_set):
    model = copy_model(tiny_lean)
    make_outlier_channels(model, block=2)
    audios, refs = [a for _, a in gate_set], [t for t, _ in gate_set]
    assert transcribe_batch(model, audios) == transcribe_batch(tiny_lean, audios)  # fp32 unchanged
    art = quantize_model(model, calibration, audios, refs, Settings(max_wer_increase=0.01))
    report = art.report
    assert report["steps"][0]["increase"] > 0.1  # all-int8 is far outside the tolerance
    assert report["sensitivity"][0]["unit"] == "encoder.blocks.2"  # measured as the most sensitive
    assert report["fp32_units"] == ["encoder.blocks.2"] and art.float_units == [2]
    assert report["gate"]["passed"] and report["gate"]["increase"] <= 0.01
    # The hybrid artifact rebuilds (fp32 block inside the int8 model) on every engine.
    for engine in available_engines():
        loaded = build_int8_model(art.to_bytes(), engine).model
        assert isinstance(loaded.qencoder.encoder.blocks[2].mconv[2], torch.nn.BatchNorm1d)
        assert wer(refs, transcribe_batch(loaded, audios)) <= report["gate"]["fp32"]["wer"] + 0.03


def test_gate_falls_back_then_fails_with_a_report(tiny_lean, calibration, gate_set):
    model = copy_model(tiny_lean)
    make_outlier_channels(model, block=1)
    make_outlier_channels(model, block=2)
    audios, refs = [a for _, a in gate_set], [t for t, _ in gate_set]
    with pytest.raises(GateFailed, match="outside the tolerance.*max_wer_increase") as failure:
        quantize_model(model, calibration, audios, refs, Settings(max_wer_increase=0.001, max_fp32_layers=1))
    report = failure.value.report
    assert not report["gate"]["passed"] and report["fp32_units"] == []
    assert len(report["steps"]) == 2 and len(report["steps"][1]["fp32_units"]) == 1  # tried one, then failed
    assert {r["unit"] for r in report["sensitivity"][:2]} == {"encoder.blocks.1", "encoder.blocks.2"}


def test_quantize_command_writes_the_artifact_and_fails_the_gate_with_exit_1(
    tiny_nemo_file, gate_set, tmp_path, capsys
):
    folder = tmp_path / "cal"
    folder.mkdir()
    for i, (_text, audio) in enumerate(gate_set):
        sf.write(folder / f"u{i}.flac", audio, 16000)
    write_manifest(
        folder / "manifest.jsonl",
        [{"audio_filepath": f"u{i}.flac", "text": text} for i, (text, _audio) in enumerate(gate_set)],
    )
    out = tmp_path / "model.int8"
    args = [
        "quantize",
        tiny_nemo_file,
        "--calibration",
        str(folder / "manifest.jsonl"),
        "--items",
        "30",
        "--gate-items",
        "30",
        "--out",
        str(out),
    ]
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert "int8 accuracy gate" in printed and "passed" in printed and f"wrote {out}" in printed
    # what each kind of CPU will use, and what the gate used here
    assert "8-bit" in printed and "7-bit" in printed and "this CPU:" in printed and "-bit activations on" in printed
    report = Artifact.from_bytes(out.read_bytes()).report
    assert report["calibration"]["utterances"] == 30 and report["gate"]["utterances"] == 30
    assert not set(report["calibration"]["ids"]) & set(report["gate"]["ids"])  # disjoint samples
    # An unreachable tolerance in "agreement" mode (no references) with no fp32 fallback allowed.
    write_manifest(folder / "no_text.jsonl", [{"audio_filepath": f"u{i}.flac"} for i in range(len(gate_set))])
    failed = tmp_path / "failed.int8"
    assert (
        main(
            [
                "quantize",
                tiny_nemo_file,
                "--calibration",
                str(folder / "no_text.jsonl"),
                "--out",
                str(failed),
                "--max-wer-increase",
                "0",
                "--max-fp32-layers",
                "0",
            ]
        )
        == 1
    )
    captured = capsys.readouterr()
    assert "FAILED" in captured.out and "error: int8 accuracy is outside the tolerance" in captured.err
    assert not failed.exists()


DEMO_MODEL = Path(__file__).resolve().parents[1] / "runner" / "data" / "demo_quartznet.nemo"
DEMO_MANIFESTS = Path(__file__).resolve().parents[1] / "manifests" / "demo"


def test_trained_demo_model_int8_agrees_with_fp32(tmp_path):
    """The trained QuartzNet 5x3 (issue 5's demo model): int8 vs fp32 transcripts within 2% WER."""
    from runner.inputs.audio import load_audio
    from runner.inputs.manifest import iter_manifest
    from runner.int8.make import make_artifact
    from runner.model.nemo_loader import load_any

    data = make_artifact(
        str(DEMO_MODEL),
        str(DEMO_MANIFESTS / "test.jsonl"),
        str(DEMO_MANIFESTS / "calibration.jsonl"),
        Settings(),
        use_cache=False,
    ).data
    art = Artifact.from_bytes(data)
    assert art.report["gate"]["passed"] and art.report["gate"]["mode"] == "references"
    items = list(iter_manifest(DEMO_MANIFESTS / "test.jsonl"))
    audios = [load_audio(i.audio_filepath, 16000) for i in items]
    fp32 = transcribe_batch(load_any(DEMO_MODEL), audios)
    int8 = transcribe_batch(build_int8_model(data, "auto").model, audios)
    refs = [i.text for i in items]
    print(
        f"demo model, {len(items)} held-out utterances: WER fp32 {wer(refs, fp32):.4f}, int8 {wer(refs, int8):.4f}, "
        f"int8 vs fp32 {wer(fp32, int8):.4f}; observer {art.report['observer']}"
    )
    assert wer(fp32, int8) <= 0.02
    assert wer(refs, int8) <= wer(refs, fp32) + 0.005


def test_the_probe_times_engines_and_drops_a_clear_loser_after_one_pass_at_its_shape():
    """`time_engines` on engines that cost a known time per call and per frame (what a quantized model's
    forward pass costs, less the model): the one that is over 3x the best at the probe's shape is not
    timed again (on the conv family, fbgemm is 10-40x onednn on some CPUs: each pass costs ~0.7 s)."""
    import time

    cost = {"onednn": (5e-3, 1e-5), "x86": (0.0, 2e-4), "fbgemm": (5e-3, 1.2e-5)}  # seconds per call, per frame
    calls = {engine: [] for engine in cost}

    def build(engine):
        per_call, per_frame = cost[engine]

        def run(feats, lens):
            calls[engine].append(feats.shape[-1])
            time.sleep(per_call + per_frame * feats.shape[-1])

        return run

    seconds = time_engines(build, 80, list(cost), frames=200, budget_seconds=0.3)
    assert calls["x86"] == [16, 200]  # its short pass is within 10x, its pass at 2 s is not within 3x
    assert calls["onednn"][:2] == calls["fbgemm"][:2] == [16, 200] and len(calls["fbgemm"]) >= 3
    assert seconds["x86"] > 3 * seconds["onednn"] and choose_engine(seconds) == "onednn"
    assert seconds["onednn"] == pytest.approx((5e-3 + 200e-5) / 2, rel=0.5)  # per second of audio (2 s)
