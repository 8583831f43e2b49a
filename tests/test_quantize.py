"""int8 static quantization of the lean model (first slice of the quantizer: no artifact/gate yet)."""

import pytest
import torch

from runner.corpus import sentences, synthesize_many
from runner.metrics import wer
from runner.quantize import ENGINES, fusion_groups, quantize
from runner.transcribe import DecodeOptions, transcribe_batch
from tests.conftest import pad


@pytest.fixture(scope="module")
def calibration():
    """Calibration audio kept apart from the held-out `speech` set (other sentences, other seed)."""
    return [a for _t, _v, a in synthesize_many(sentences(24, seed=9), seed=9)]


def test_fusion_covers_every_conv_bn_pair(tiny_lean):
    groups = fusion_groups(tiny_lean.encoder)
    bns = [n for n, m in tiny_lean.encoder.named_modules() if isinstance(m, torch.nn.BatchNorm1d)]
    assert sorted(f"encoder.{n}" for n in bns) == sorted(g[1] for g in groups)
    assert any(len(g) == 3 for g in groups)  # conv + bn + relu inside repeated sub-blocks


@pytest.mark.parametrize("engine", [e for e in ENGINES if e in torch.backends.quantized.supported_engines])
def test_int8_agrees_with_fp32_on_every_engine(tiny_lean, speech, calibration, engine):
    audios = [a for _, a in speech]
    int8 = quantize(tiny_lean, calibration, engine)
    fp32_text = transcribe_batch(tiny_lean, audios)
    int8_text = transcribe_batch(int8, audios)
    agreement = wer(fp32_text, int8_text)
    print(engine, "WER of int8 against fp32 hypotheses:", agreement)
    # onednn/qnnpack use full-range 8-bit activations; x86/fbgemm reduce them to 7 bits. The
    # issue's target (<= 2%) needs the observer choice and the accuracy gate, still to come:
    # this 0.17 M-parameter model measures 2.7-3.4% (onednn/qnnpack) and 5.8% (x86/fbgemm).
    assert agreement <= (0.05 if engine in ("onednn", "qnnpack") else 0.08)


def test_int8_transcript_does_not_depend_on_batch(tiny_lean, speech, calibration):
    int8 = quantize(tiny_lean, calibration, "onednn")
    audios = [a for _, a in speech[:12]]
    batched = transcribe_batch(int8, audios, DecodeOptions(batch_size=12))
    alone = [transcribe_batch(int8, [a], DecodeOptions(batch_size=1))[0] for a in audios]
    assert batched == alone


def test_int8_model_runs_convs_in_int8(tiny_lean, calibration, speech):
    int8 = quantize(tiny_lean, calibration, "onednn")
    kinds = {type(m).__name__ for m in int8.qencoder.modules()}
    assert {"ConvReLU1d", "Conv1d", "Quantize", "DeQuantize"} <= kinds
    assert "BatchNorm1d" not in kinds
    log_probs, lens = int8(*pad([speech[0][1]]))
    assert torch.isfinite(log_probs).all() and 0 < int(lens[0]) <= log_probs.shape[1]
