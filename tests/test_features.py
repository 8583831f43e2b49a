"""Lean log-mel features vs NeMo's AudioToMelSpectrogramPreprocessor."""

import numpy as np
import pytest
import torch

from runner.model.arch import FeatureConfig
from runner.model.features import MelFeatures, mel_filterbank
from runner.model.transcribe import whole_file_features

from .support import pad


def nemo_features(nemo_model, audios):
    batch, lengths = pad(audios)
    with torch.no_grad():
        return nemo_model.preprocessor(input_signal=batch, length=lengths)


def test_features_match_nemo_on_mixed_length_speech_batch(tiny_nemo, tiny_lean, speech):
    audios = [a for _, a in speech[:16]]
    assert len({len(a) for a in audios}) == 16  # really mixed lengths
    expected, expected_len = nemo_features(tiny_nemo, audios)
    got, got_len = tiny_lean.features(*pad(audios))
    assert torch.equal(got_len, expected_len)
    frames = got.shape[-1]
    diff = (got - expected[..., :frames]).abs().max().item()  # NeMo pads to a multiple of 16 frames
    assert diff <= 1e-4, diff
    assert expected[..., frames:].abs().max() == 0


def test_features_are_batch_independent(tiny_lean, speech):
    audios = [a for _, a in speech[:8]]
    batch, n = tiny_lean.features(*pad(audios))
    for i, a in enumerate(audios):
        alone, m = tiny_lean.features(*pad([a]))
        assert (batch[i, :, : n[i]] - alone[0, :, : m[0]]).abs().max() <= 1e-5


def test_filterbank_matches_librosa_without_checkpoint_buffers():
    librosa = pytest.importorskip("librosa")
    cfg = FeatureConfig()
    ours = mel_filterbank(cfg)
    ref = librosa.filters.mel(sr=cfg.sample_rate, n_fft=cfg.n_fft, n_mels=cfg.n_mels, fmin=0, fmax=8000, norm="slaney")
    assert np.abs(ours - ref).max() < 1e-6


def test_chunked_whole_file_features_equal_batch_features(tiny_lean, speech):
    audio = np.concatenate([a for _, a in speech[:6]])
    full, n = tiny_lean.features(*pad([audio]))
    for chunk in (37, 250, 10_000):
        chunked = whole_file_features(tiny_lean, audio, chunk_frames=chunk)
        assert chunked.shape[1] == int(n[0])
        assert (chunked - full[0, :, : n[0]]).abs().max() <= 1e-4


def test_silence_and_tiny_inputs_do_not_produce_nan():
    mel = MelFeatures(FeatureConfig())
    feats, n = mel(*pad([np.zeros(16000, np.float32), np.zeros(400, np.float32)]))
    assert torch.isfinite(feats).all()
    assert n.tolist() == [100, 2]
