"""Lean fp32 model vs NeMo: logits, transcripts, batch independence, checkpoint round trip."""

import io

import pytest
import torch

from runner.metrics import cer
from runner.model.ctc import build_model, load_checkpoint, save_checkpoint
from runner.model.decoding import greedy_decode
from runner.model.nemo_loader import describe, load_nemo
from runner.model.transcribe import DecodeOptions, transcribe_batch
from runner.model.words import ConfidenceMethod
from runner.training.nemo_words import compare_with_nemo

from .support import max_logit_diff, pad


def test_tiny_logits_match_nemo_on_mixed_lengths(tiny_nemo, tiny_lean, speech):
    for start in (0, 16):
        diff = max_logit_diff(tiny_nemo, tiny_lean, [a for _, a in speech[start : start + 16]])
        assert diff <= 1e-3, diff


def test_quartznet15x5_logits_match_nemo(quartznet15x5_nemo, speech):
    lean = build_model(*describe(quartznet15x5_nemo))
    assert sum(p.numel() for p in lean.parameters()) == sum(p.numel() for p in quartznet15x5_nemo.parameters())
    diff = max_logit_diff(quartznet15x5_nemo, lean, [a for _, a in speech[:6]])
    assert diff <= 1e-3, diff


def test_transcripts_identical_to_nemo_transcribe(tiny_nemo, tiny_lean, speech_files):
    from runner.inputs.audio import load_audio

    texts = [t for t, _ in speech_files]
    paths = [p for _, p in speech_files]
    nemo_out = tiny_nemo.transcribe(paths, batch_size=4, verbose=False)
    tiny_nemo.eval()  # NeMo 3.0's transcribe() leaves the encoder's BatchNorm in training mode
    nemo_texts = [h.text if hasattr(h, "text") else h for h in nemo_out]
    ours = transcribe_batch(tiny_lean, [load_audio(p, 16000) for p in paths])
    assert len(ours) >= 20
    assert ours == nemo_texts
    # The comparison means something only if the model really transcribes.
    assert all(ours) and cer(texts, ours) < 0.15, cer(texts, ours)


def test_transcript_does_not_depend_on_batch(tiny_lean, speech):
    audios = [a for _, a in speech[:16]]
    batched = transcribe_batch(tiny_lean, audios, DecodeOptions(batch_size=16))
    alone = [transcribe_batch(tiny_lean, [a], DecodeOptions(batch_size=1))[0] for a in audios]
    assert batched == alone


def test_stage_timings_leave_transcripts_unchanged(tiny_lean, speech):
    """A `timings` dict gets seconds per stage, windowed files included; the texts stay bit-identical."""
    audios = [a for _, a in speech[:6]]
    for options in (DecodeOptions(batch_size=4), DecodeOptions(window_seconds=1.0, context_seconds=0.5)):
        timings: dict = {}
        assert transcribe_batch(tiny_lean, audios, options, timings) == transcribe_batch(tiny_lean, audios, options)
        assert set(timings) == {"features", "encoder", "decode"} and min(timings.values()) > 0


def test_logits_do_not_depend_on_batch(tiny_lean, speech):
    audios = [a for _, a in speech[:16]]
    lp, n = tiny_lean(*pad(audios))
    for i in (0, 5, 15):
        lp1, n1 = tiny_lean(*pad([audios[i]]))
        assert int(n1[0]) == int(n[i])
        assert (lp[i, : n[i]] - lp1[0, : n1[0]]).abs().max() <= 1e-4


def test_nemo_file_and_lean_checkpoint_round_trip(tiny_nemo, tiny_nemo_file, speech):
    spec, state = load_nemo(tiny_nemo_file)
    buf = io.BytesIO()
    save_checkpoint(spec, state, buf)
    buf.seek(0)
    spec2, state2 = load_checkpoint(buf)
    assert spec2 == spec
    lean = build_model(spec2, state2)
    assert max_logit_diff(tiny_nemo, lean, [a for _, a in speech[:4]]) <= 1e-5


def test_greedy_decoding_merges_repeats_and_drops_blanks():
    vocab = ["a", "b", " "]
    ids = [0, 0, 3, 0, 1, 1, 3, 3, 2, 1]  # a a _ a b b _ _ ' ' b  (3 = blank)
    lp = torch.full((1, len(ids), 4), -10.0)
    for t, i in enumerate(ids):
        lp[0, t, i] = 0.0
    assert greedy_decode(lp, torch.tensor([len(ids)]), vocab) == ["aab b"]
    assert greedy_decode(lp, torch.tensor([3]), vocab) == ["a"]


@pytest.mark.parametrize(
    "method",
    [
        ConfidenceMethod(),  # NeMo's defaults: Tsallis entropy, alpha 0.33, exp norm, min
        ConfidenceMethod(method="max_prob", alpha=1.0, aggregation="mean"),
        ConfidenceMethod(entropy_type="renyi", entropy_norm="lin", aggregation="prod", exclude_blank=False),
    ],
    ids=["nemo-default", "max_prob-mean", "renyi-lin-prod-with-blanks"],
)
def test_words_times_and_confidence_match_nemo(tiny_nemo, tiny_lean, speech_files, method):
    """Word strings and start/end frames as NeMo's `transcribe(timestamps=True)`; confidence within 1e-4
    of NeMo's for the same method (character vocabulary)."""
    figures, ours = compare_with_nemo(tiny_nemo, tiny_lean, [p for _, p in speech_files], method)
    assert figures["utterances_differ"] == 0 and figures["words"] >= 100, figures
    assert figures["same_frames"] == figures["words"], figures
    assert figures["max_confidence_diff"] <= 1e-4, figures
    assert all(0.0 <= w["confidence"] <= 1.0 for t in ours for w in t.words)


@pytest.mark.parametrize(
    "kernel, stride, dilation, padding, groups",
    [(75, 1, 1, 37, 512), (33, 2, 1, 16, 64), (3, 1, 2, 2, 512), (1, 1, 1, 0, 1), (11, 1, 1, 5, 1)],
)
def test_channels_last_conv_equals_the_module_and_runs_its_observer(kernel, stride, dilation, padding, groups):
    """`conv_channels_last` (the float conv family's path) computes what nn.Conv1d computes, on a
    [B, C, T]-contiguous or a channels-last input, keeps the output channels-last, and runs the fused
    module's forward hooks (calibration's observers) on the output the module would give them."""
    from torch.ao.nn.intrinsic import ConvReLU1d
    from torch.ao.quantization import MovingAverageMinMaxObserver

    from runner.model.conv import batch_norm, conv_channels_last

    torch.manual_seed(0)
    channels = 512 if groups == 512 else 64
    conv = torch.nn.Conv1d(channels, channels, kernel, stride, padding, dilation, groups, bias=True).eval()
    x = torch.randn(3, channels, 97)
    with torch.inference_mode():
        want = conv(x)
        for given in (x, x.transpose(1, 2).contiguous().transpose(1, 2)):
            got = conv_channels_last(conv, given)
            assert got.shape == want.shape and got.stride(1) == 1
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
        seen = {}
        for name in ("module", "ours"):  # as torch's eager prepare leaves a fused module: a child and a hook
            module = ConvReLU1d(conv, torch.nn.ReLU())
            module.activation_post_process = MovingAverageMinMaxObserver(averaging_constant=0.5)
            module.register_forward_hook(lambda m, args, out: m.activation_post_process(out))
            for scale in (1.0, 3.0):  # a moving average: how often each tensor is observed shows
                out = module(scale * x) if name == "module" else conv_channels_last(module, scale * x)
            seen[name] = (out, module.activation_post_process.min_val, module.activation_post_process.max_val)
        torch.testing.assert_close(seen["ours"], seen["module"], rtol=1e-5, atol=1e-5)
        assert float(seen["ours"][1]) == 0.0  # the ReLU ran before the observer saw the output
        bn = torch.nn.BatchNorm1d(channels).eval()
        bn.running_mean.normal_(), bn.running_var.uniform_(0.5, 2.0), bn.weight.data.normal_()
        normed = batch_norm(bn, got)
        assert normed.stride(1) == 1
        torch.testing.assert_close(normed, bn(want), rtol=1e-5, atol=1e-5)
