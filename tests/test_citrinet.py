"""Citrinet (EncDecCTCModelBPE: squeeze-excite blocks + a SentencePiece tokenizer): the lean model
against NeMo, int8 through the gate, the artifact without NeMo, and a job on local Ray.

A small Citrinet and its tokenizer are trained here (about a minute on 2 cores) on the conftest's
espeak-ng grammar, so transcripts are real and int8-vs-fp32 agreement means something.
"""

import json

import numpy as np
import pyarrow.parquet as pq
import pytest
import soundfile as sf
import torch

from runner.errors import UnsupportedModelError
from runner.int8 import direct
from runner.int8.artifact import build_int8_model
from runner.int8.config import Settings
from runner.int8.engines import available_engines
from runner.int8.pipeline import quantize_model
from runner.metrics import cer, wer
from runner.model.arch import ModelSpec
from runner.model.conv import SqueezeExcite
from runner.model.ctc import build_model
from runner.model.decoding import TextDecoder
from runner.model.nemo_loader import check_supported, describe, load_nemo
from runner.model.transcribe import DecodeOptions, transcribe_batch
from runner.model.words import ConfidenceMethod
from runner.training.corpus import sentences
from runner.training.nemo_words import compare_with_nemo

from .support import (
    HEAVY,
    RATE,
    TRAIN_SEED,
    TRAIN_SENTENCES,
    calibration_audio,
    copy_model,
    direct_vs_modules,
    fresh_process_transcripts,
    held_out_gate,
    max_logit_diff,
    pad,
    pinned_engine,
    valid_frames,
    write_manifest,
)

TRAIN_STEPS = 300


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory) -> str:
    from runner.training.recipes import train_tokenizer

    return train_tokenizer(sentences(TRAIN_SENTENCES, TRAIN_SEED), tmp_path_factory.mktemp("spm"), vocab_size=256)


@pytest.fixture(scope="module")
def citrinet_nemo(tokenizer_dir, train_speech):
    """A small NeMo Citrinet (SE, stride_last/stride_add, 8x stride, BPE) trained briefly on espeak-ng speech."""
    from runner.training.recipes import build_nemo_model, small_citrinet_config, train_ctc

    torch.manual_seed(0)
    model = build_nemo_model(small_citrinet_config(tokenizer_dir))
    # One thread: the same weights whatever ASR_RUNNER_TEST_THREADS is (the agreement figures below were
    # measured on them).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return train_ctc(model, train_speech, steps=TRAIN_STEPS, seed=0)
    finally:
        torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def citrinet_lean(citrinet_nemo):
    return build_model(*describe(citrinet_nemo))


@pytest.fixture(scope="module")
def citrinet_file(citrinet_nemo, tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("models") / "small_citrinet.nemo"
    citrinet_nemo.save_to(str(path))
    return str(path)


@pytest.fixture(scope="module")
def gate_data():
    """Calibration audio and held-out (text, audio) for the gate: apart from training and `speech`."""
    return calibration_audio(24), held_out_gate(30)


@pytest.fixture(scope="module")
def artifact(citrinet_lean, gate_data):
    """int8 through the unchanged gate, default settings (it picks among three activation observers) but one
    engine, not `auto`: a timing probe must not decide which int8 arithmetic the test sees."""
    calibration, gate = gate_data
    settings = Settings(engine=pinned_engine())
    return quantize_model(citrinet_lean, calibration, [a for _, a in gate], [t for t, _ in gate], settings)


def test_lean_citrinet_matches_nemo_and_does_not_depend_on_the_batch(citrinet_nemo, citrinet_lean, speech):
    assert any(isinstance(m, SqueezeExcite) for m in citrinet_lean.modules())
    audios = [a for _, a in speech[:16]]  # mixed lengths: padding differs per utterance
    assert max_logit_diff(citrinet_nemo, citrinet_lean, audios) <= 1e-3
    lp, n = citrinet_lean(*pad(audios))
    for i in (0, 7, 15):
        lp1, n1 = citrinet_lean(*pad([audios[i]]))
        assert int(n1[0]) == int(n[i]) and (lp[i, : n[i]] - lp1[0, : n1[0]]).abs().max() <= 1e-4


@pytest.fixture(scope="module")
def citrinet_256(tokenizer_dir):
    """NeMo's Citrinet-256 layout (9.7 M parameters here) with random weights and BN statistics."""
    from runner.training.recipes import build_nemo_model, citrinet_256_config, randomize_batchnorm

    torch.manual_seed(0)
    nemo = build_nemo_model(citrinet_256_config(tokenizer_dir))
    randomize_batchnorm(nemo)
    return nemo


def test_full_size_citrinet_256_matches_nemo(citrinet_256, speech):
    lean = build_model(*describe(citrinet_256))
    assert sum(p.numel() for p in lean.parameters()) == sum(p.numel() for p in citrinet_256.parameters())
    assert max_logit_diff(citrinet_256, lean, [a for _, a in speech[:4]]) <= 1e-3


def test_transcripts_identical_to_nemo_transcribe(citrinet_nemo, citrinet_lean, speech_files):
    from runner.inputs.audio import load_audio

    paths = [p for _, p in speech_files]
    nemo_out = citrinet_nemo.transcribe(paths, batch_size=8, verbose=False)
    citrinet_nemo.eval()  # NeMo 3.0's transcribe() leaves BatchNorm in training mode
    nemo_texts = [h.text if hasattr(h, "text") else h for h in nemo_out]
    ours = transcribe_batch(citrinet_lean, [load_audio(p, RATE) for p in paths], DecodeOptions(batch_size=8))
    assert ours == nemo_texts
    refs = [t for t, _ in speech_files]
    print(f"small Citrinet after {TRAIN_STEPS} steps: held-out WER {wer(refs, ours):.3f}, CER {cer(refs, ours):.3f}")
    assert all(ours) and cer(refs, ours) < 0.25  # it really transcribes: the comparison means something


def test_tokenizer_travels_in_the_spec_and_decodes_as_nemo(citrinet_nemo, citrinet_file, tokenizer_dir):
    spec, _ = load_nemo(citrinet_file)
    assert spec.source["model"] == "EncDecCTCModelBPE" and spec.tokenizer.kind == "sentencepiece"
    with open(f"{tokenizer_dir}/tokenizer.model", "rb") as f:
        assert spec.tokenizer.model_bytes() == f.read()
    again = ModelSpec.from_dict(json.loads(json.dumps(spec.to_dict())))  # JSON-safe
    assert again == spec
    text = TextDecoder.from_spec(again)
    rng = np.random.default_rng(0)
    for _ in range(50):
        ids = rng.integers(0, len(spec.vocabulary), size=int(rng.integers(0, 30))).tolist()
        assert text(ids) == citrinet_nemo.tokenizer.ids_to_text(ids)


def test_other_tokenizers_are_refused_naming_what_was_found():
    config = {
        "target": "nemo.collections.asr.models.EncDecCTCModelBPE",
        "preprocessor": {"_target_": "x.AudioToMelSpectrogramPreprocessor"},
        "encoder": {"_target_": "x.ConvASREncoder"},
        "decoder": {"_target_": "x.ConvASRDecoder"},
        "tokenizer": {"type": "wpe", "dir": "/x"},
    }
    with pytest.raises(UnsupportedModelError, match=r"m.nemo: EncDecCTCModelBPE with tokenizer.type='wpe'.*bpe"):
        check_supported(config, "m.nemo")
    check_supported({**config, "tokenizer": {"type": "bpe", "dir": "/x"}}, "m.nemo")  # the supported kind passes


def test_int8_passes_the_gate_and_agrees_with_fp32(citrinet_lean, artifact, speech):
    gate = artifact.report["gate"]
    assert gate["passed"] and gate["mode"] == "references" and artifact.report["fp32_units"] == []
    audios = [a for _, a in speech]
    references = [t for t, _ in speech]
    fp32 = transcribe_batch(citrinet_lean, audios)
    feats, frames = citrinet_lean.features(*pad(audios))
    with torch.inference_mode():
        ref, lens = citrinet_lean.logits(feats, frames)
    ref = valid_frames(ref, lens)
    for engine in available_engines():  # one engine-neutral artifact, every engine
        built = build_int8_model(artifact.to_bytes(), engine)
        int8 = transcribe_batch(built.model, audios)
        agreement, increase = 1 - wer(fp32, int8), wer(references, int8) - wer(references, fp32)
        with torch.inference_mode():
            logits = valid_frames(built.model.logits(feats, frames)[0], lens)
        cosine = float(torch.nn.functional.cosine_similarity(logits, ref, dim=1).mean())
        bits = built.int8_check["activation_bits"]
        print(
            f"{engine}, {bits}-bit activations: logit cosine {cosine:.6f}, int8 vs fp32 agreement {agreement:.4f}, "
            f"WER {increase:+.4f} on {len(audios)} held-out clips"
        )
        # The logits are the guarantee, on every engine and CPU kind. Measured: 0.99993-0.99994 at 8 bits
        # (VNNI EPYC), 0.99988-0.99989 at 7 bits (the AVX2 kind, emulated as below); 8 bits on the AVX2 kind's
        # saturating pointwise kernels gave 0.99961.
        assert cosine >= 0.9998, (engine, bits, cosine)
        # The words of this tiny model hold near-ties, which rounding flips (one held-out word is 0.35
        # points). Measured, agreement / WER change (the gate picks histogram):
        # - 8 bits, Intel Xeon (AVX-512 VNNI, AMX): 98.3-98.6% on onednn, x86 and fbgemm; qnnpack 97.2-98.3%;
        # - 8 bits, AMD EPYC (AVX-512 VNNI, no AMX), one artifact: onednn and x86 97.2% / +0.68, fbgemm
        #   98.3% / +0.34, qnnpack 98.6% / 0.00;
        # - 7 bits (the AVX2 kind, emulated on a Zen 5 EPYC: oneDNN and MKL capped at AVX2, the int8 flags
        #   overridden): 97.9-98.3% / +0.34 to +0.68 with ATen's own kernels on AVX2 too, but 95.0-96.1% /
        #   -0.34 to +1.71 with them on AVX-512 (another trained fixture), the logits' cosine 0.99988 on both.
        # Saturating 8-bit kernels (AVX2 without the 7-bit rule) gave 96.2% on onednn and 85% on x86.
        floor, most = (0.97, 0.01) if bits == 8 else (0.94, 0.02)
        assert agreement >= floor and increase <= most, (engine, bits, agreement, increase)


@pytest.mark.skipif(not direct.applies("onednn"), reason="oneDNN's int8 ops are called directly on x86 builds of torch")
def test_the_direct_int8_forward_agrees_with_the_modules(artifact, citrinet_lean, speech):
    """Squeeze-excite, stride-2 residual branches and BPE: `runner.int8.direct` against the modules on a
    padded batch; the transcripts are the same."""
    built = build_int8_model(artifact.to_bytes(), "onednn")
    audios = [a for _, a in speech[:6]]
    figures = direct_vs_modules(built, audios, citrinet_lean)
    assert figures["cosine"] >= 0.999 and figures["worst_frame_cosine"] >= 0.995, figures
    assert figures["argmax"] >= 0.99 and figures["steps"] <= 16, figures
    assert figures["direct_vs_fp32"] >= figures["modules_vs_fp32"] - 1e-4, figures
    texts = transcribe_batch(built.model, audios)
    built.model.qencoder.direct = False
    assert texts == transcribe_batch(built.model, audios) and all(texts), texts


def test_gate_keeps_a_sensitive_se_block_in_fp32(citrinet_lean, gate_data, speech):
    """The unchanged gate on a Citrinet: an SE block made hostile to per-tensor int8 (same fp32 function)
    goes back to fp32, and the hybrid artifact rebuilds on every engine."""
    lean = copy_model(citrinet_lean)
    layers = lean.encoder.blocks[2].mconv  # depthwise, pointwise, BN, SqueezeExcite
    with torch.no_grad():  # 1000x larger depthwise outputs in 4 channels, undone by the pointwise conv
        layers[0].conv.weight[:4] *= 1000
        layers[1].conv.weight[:, :4] /= 1000
    audios = [a for _, a in speech[:16]]
    before = transcribe_batch(citrinet_lean, audios)
    assert transcribe_batch(lean, audios) == before  # fp32 unchanged
    calibration, gate = gate_data
    art = quantize_model(
        lean,
        calibration,
        [a for _, a in gate],
        [t for t, _ in gate],
        Settings(observers=("histogram",), max_wer_increase=0.02),
    )
    report = art.report
    assert report["steps"][0]["increase"] > 0.02 and report["gate"]["passed"]
    assert report["sensitivity"][0]["unit"] == "encoder.blocks.2"  # measured as the most sensitive
    assert report["fp32_units"] == ["encoder.blocks.2"] and art.float_units == [2]
    for engine in available_engines():
        model = build_int8_model(art.to_bytes(), engine).model
        block = model.qencoder.encoder.blocks[2]
        assert isinstance(block.mconv[-1], SqueezeExcite) and isinstance(block.mconv[2], torch.nn.BatchNorm1d)
        assert wer(before, transcribe_batch(model, audios)) <= 0.05, engine


def test_artifact_rebuilds_in_a_fresh_process_without_nemo(artifact, speech_files, tmp_path):
    wavs = [p for _, p in speech_files[:6]]
    out, _ = fresh_process_transcripts(artifact, wavs, "onednn", tmp_path)
    assert not HEAVY & set(out["modules"]) and "sentencepiece" in out["modules"]
    here = build_int8_model(artifact.to_bytes(), "onednn").model
    assert out["texts"] == transcribe_batch(here, [sf.read(p, dtype="float32")[0] for p in wavs])
    assert all(out["texts"])


@pytest.mark.slow
def test_citrinet_int8_job_on_local_ray_writes_transcripts(ray_local, citrinet_file, speech, tmp_path, monkeypatch):
    from runner.job.run import run_job
    from runner.job.run_folder import read_rows
    from runner.job.spec import load_spec

    rows = []
    for i, (text, audio) in enumerate(speech[:24]):
        sf.write(tmp_path / f"u{i:02d}.flac", audio, RATE)
        rows.append({"audio_filepath": f"u{i:02d}.flac", "text": text})
    write_manifest(tmp_path / "manifest.jsonl", rows)
    spec_file = tmp_path / "job.yaml"
    spec_file.write_text(
        f"model: {citrinet_file}\nmanifest: manifest.jsonl\noutput: run\nprecision: int8\n"
        "workers: 2\nshard_seconds: 20\nquantization:\n  calibration_items: 12\n  gate_items: 12\n"
        "  max_wer_increase: 0.02\n"
    )
    monkeypatch.setenv("ASR_RUNNER_CACHE", str(tmp_path / "cache"))
    run_job(load_spec(spec_file))
    out = tmp_path / "run"
    table = read_rows(out).to_pylist()
    stats = json.loads((out / "stats.json").read_text())
    assert (out / "_SUCCESS").exists() and len(table) == len(rows)
    assert all(r["status"] == "ok" and r["text"] for r in table)
    assert stats["precision"] == "int8" and stats["worker_heavy_imports"] == [] and stats["wer"] < 0.5
    assert len(list((out / "transcripts").glob("*.parquet"))) >= 2
    assert pq.read_schema(next((out / "transcripts").glob("*.parquet"))).metadata[b"asr_runner"]


def test_words_times_and_confidence_match_nemo_for_sentencepiece(citrinet_nemo, citrinet_lean, speech_files):
    """Subword words (pieces joined at `▁`) with NeMo's start/end frames and confidence within 1e-4."""
    paths = [p for _, p in speech_files[:24]]
    figures, _ = compare_with_nemo(citrinet_nemo, citrinet_lean, paths, ConfidenceMethod())
    assert figures["utterances_differ"] == 0 and figures["words"] >= 60, figures
    assert figures["same_frames"] == figures["words"] and figures["max_confidence_diff"] <= 1e-4, figures
