"""Log-mel features, numerically the same as NeMo's `AudioToMelSpectrogramPreprocessor` at inference.

Torch and numpy only. The mel filterbank and window are computed here (Slaney mel scale, as
librosa does) and then overwritten by the exact buffers of the `.nemo` checkpoint when its
weights are loaded. Dither is a training-time augmentation and is never applied.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from runner.model.arch import FeatureConfig

STD_GUARD = 1e-5  # NeMo's CONSTANT, added to the per-feature standard deviation

# Symmetric windows (torch's `periodic=False`), computed with numpy: building the model on
# the meta device then needs no torch decompositions (their import costs ~80 MB of RSS).
_WINDOWS = {"hann": np.hanning, "hamming": np.hamming, "blackman": np.blackman, "bartlett": np.bartlett}


def _hz_to_mel(freq: np.ndarray) -> np.ndarray:
    """Slaney's mel scale: linear below 1 kHz, logarithmic above (librosa's default)."""
    freq = np.asanyarray(freq, dtype=np.float64)
    f_sp, min_log_hz = 200.0 / 3, 1000.0
    min_log_mel, logstep = min_log_hz / f_sp, math.log(6.4) / 27.0
    mels = freq / f_sp
    high = freq >= min_log_hz
    mels[high] = min_log_mel + np.log(freq[high] / min_log_hz) / logstep
    return mels


def _mel_to_hz(mels: np.ndarray) -> np.ndarray:
    mels = np.asanyarray(mels, dtype=np.float64)
    f_sp, min_log_hz = 200.0 / 3, 1000.0
    min_log_mel, logstep = min_log_hz / f_sp, math.log(6.4) / 27.0
    freqs = f_sp * mels
    high = mels >= min_log_mel
    freqs[high] = min_log_hz * np.exp(logstep * (mels[high] - min_log_mel))
    return freqs


def mel_filterbank(cfg: FeatureConfig) -> np.ndarray:
    """Triangular mel filters [n_mels, n_fft//2+1], as `librosa.filters.mel(htk=False)`."""
    fmax = cfg.highfreq or cfg.sample_rate / 2
    fftfreqs = np.fft.rfftfreq(cfg.n_fft, d=1.0 / cfg.sample_rate)
    mel_pts = _mel_to_hz(
        np.linspace(_hz_to_mel(np.array([cfg.lowfreq]))[0], _hz_to_mel(np.array([fmax]))[0], cfg.n_mels + 2)
    )
    fdiff = np.diff(mel_pts)
    ramps = mel_pts[:, None] - fftfreqs[None, :]
    lower = -ramps[:-2] / fdiff[:-1, None]
    upper = ramps[2:] / fdiff[1:, None]
    weights = np.maximum(0.0, np.minimum(lower, upper))
    if cfg.mel_norm == "slaney":
        weights *= (2.0 / (mel_pts[2 : cfg.n_mels + 2] - mel_pts[: cfg.n_mels]))[:, None]
    return weights.astype(np.float32)


def feature_lengths(cfg: FeatureConfig, num_samples: torch.Tensor) -> torch.Tensor:
    """Number of valid feature frames for each input length (NeMo's `get_seq_len`)."""
    pad = (cfg.n_fft - cfg.hop_length) // 2 * 2 if cfg.exact_pad else cfg.n_fft // 2 * 2
    frames = torch.floor_divide(num_samples + pad - cfg.n_fft, cfg.hop_length).long()
    return torch.where(num_samples == 0, torch.zeros_like(frames), frames)


class MelFeatures(nn.Module):
    """audio [B, T] float32 in [-1, 1], lengths [B] -> normalized log-mel [B, n_mels, F], F lengths."""

    def __init__(self, cfg: FeatureConfig):
        super().__init__()
        self.cfg = cfg
        window_fn = _WINDOWS.get(cfg.window)
        window = torch.from_numpy(window_fn(cfg.win_length).astype(np.float32)) if window_fn else None
        self.register_buffer("window", window)
        self.register_buffer("fb", torch.from_numpy(mel_filterbank(cfg)).unsqueeze(0))

    @torch.no_grad()
    def forward(self, audio: torch.Tensor, lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = self.log_mel(audio, lengths)
        frames = feature_lengths(self.cfg, lengths)
        if self.cfg.normalize:
            x = normalize(x, frames, self.cfg.normalize)
        return mask_frames(x, frames, self.cfg.pad_value), frames

    def log_mel(self, audio: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """Un-normalized log-mel of every frame (frames past a length are not yet masked)."""
        cfg = self.cfg
        x = audio.float()
        if cfg.exact_pad:
            pad = (cfg.n_fft - cfg.hop_length) // 2
            x = nn.functional.pad(x.unsqueeze(1), (pad, pad)).squeeze(1)
        if cfg.preemph is not None:
            valid = torch.arange(x.shape[1]).unsqueeze(0) < lengths.unsqueeze(1)
            x = torch.cat((x[:, :1], x[:, 1:] - cfg.preemph * x[:, :-1]), dim=1)
            x = x.masked_fill(~valid, 0.0)
        return self.spectrum_to_log_mel(self.stft(x, center=not cfg.exact_pad))

    def stft(self, x: torch.Tensor, center: bool) -> torch.Tensor:
        cfg = self.cfg
        return torch.stft(
            x,
            n_fft=cfg.n_fft,
            hop_length=cfg.hop_length,
            win_length=cfg.win_length,
            center=center,
            window=self.window,
            return_complex=True,
            pad_mode="constant",
        )

    def spectrum_to_log_mel(self, spec: torch.Tensor) -> torch.Tensor:
        """Complex STFT [B, n_fft//2+1, F] -> log-mel [B, n_mels, F]."""
        cfg = self.cfg
        power = torch.sqrt(torch.view_as_real(spec).pow(2).sum(-1))
        if cfg.mag_power != 1.0:
            power = power.pow(cfg.mag_power)
        x = torch.matmul(self.fb, power)
        if cfg.log:
            guard = _log_guard(cfg.log_zero_guard_value, x.dtype)
            x = torch.log(x + guard) if cfg.log_zero_guard_type == "add" else torch.log(x.clamp(min=guard))
        return x


def _log_guard(value, dtype: torch.dtype) -> float:
    if value == "tiny":
        return torch.finfo(dtype).tiny
    if value == "eps":
        return torch.finfo(dtype).eps
    return float(value)


def normalize(x: torch.Tensor, frames: torch.Tensor, kind: str) -> torch.Tensor:
    """NeMo's `normalize_batch`: statistics over each utterance's valid frames only."""
    valid = (torch.arange(x.shape[2]).unsqueeze(0) < frames.unsqueeze(1)).unsqueeze(1)
    if kind == "per_feature":
        count = valid.sum(dim=2).to(x.dtype)
        mean = torch.where(valid, x, 0.0).sum(dim=2) / count
        var = torch.where(valid, x - mean.unsqueeze(2), 0.0).pow(2).sum(dim=2) / (count - 1.0)
        std = torch.sqrt(var)
        std = std.masked_fill(std.isnan(), 0.0) + STD_GUARD  # one valid frame: NeMo uses 0
        out = (x - mean.unsqueeze(2)) / std.unsqueeze(2)
        return out.masked_fill(~valid, 0.0)
    if kind == "all_features":
        mean = torch.stack([x[i, :, : int(n)].mean() for i, n in enumerate(frames)])
        std = torch.stack([x[i, :, : int(n)].std() for i, n in enumerate(frames)]) + STD_GUARD
        return (x - mean.view(-1, 1, 1)) / std.view(-1, 1, 1)
    return x


def mask_frames(x: torch.Tensor, frames: torch.Tensor, value: float) -> torch.Tensor:
    invalid = torch.arange(x.shape[-1]).unsqueeze(0) >= frames.unsqueeze(1)
    return x.masked_fill(invalid.unsqueeze(1), value)


@dataclass(frozen=True)
class FeatureSums:
    """Per-bin sums of raw log-mel frames [n_mels] (float64): what a part of a file adds to its
    normalization statistics. Parts add up exactly; `LineNorm.combine` turns their total into NeMo's
    statistics, so parts of one long file, featurized apart, normalize as the whole file does."""

    total: tuple[float, ...]
    squares: tuple[float, ...]
    count: int

    @classmethod
    def of(cls, x: torch.Tensor) -> FeatureSums:
        """The sums of raw log-mel frames [n_mels, F]."""
        x = x.double()
        return cls(tuple(x.sum(dim=1).tolist()), tuple(x.pow(2).sum(dim=1).tolist()), int(x.shape[1]))


@dataclass(frozen=True)
class LineNorm:
    """Normalization statistics given from outside (per bin; `all_features`: one value repeated)."""

    mean: tuple[float, ...]
    std: tuple[float, ...]

    @classmethod
    def combine(cls, parts: list[FeatureSums], kind: str) -> LineNorm | None:
        """NeMo's `per_feature` / `all_features` statistics of the frames of all `parts` (unbiased std
        plus its guard); None for other normalizations (nothing to share)."""
        if kind not in ("per_feature", "all_features") or not parts:
            return None
        total = np.sum([p.total for p in parts], axis=0)
        squares = np.sum([p.squares for p in parts], axis=0)
        count = float(sum(p.count for p in parts))
        if kind == "all_features":
            total, squares, count = (
                np.full_like(total, total.sum()),
                np.full_like(squares, squares.sum()),
                count * len(total),
            )
        mean = total / count
        var = np.maximum(squares - count * mean**2, 0.0) / (count - 1.0) if count > 1 else np.zeros_like(mean)
        return cls(tuple(mean.tolist()), tuple((np.sqrt(var) + STD_GUARD).tolist()))

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        """Raw log-mel [n_mels, F] -> normalized with these statistics."""
        mean = torch.tensor(self.mean, dtype=x.dtype).unsqueeze(1)
        std = torch.tensor(self.std, dtype=x.dtype).unsqueeze(1)
        return (x - mean) / std
