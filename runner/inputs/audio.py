"""Audio input: anything libsndfile reads, as mono float32 at the model's sample rate.

WAV (16/24/32-bit, float), FLAC, OGG/Vorbis/Opus and MP3 are read through soundfile. An
`offset`/`duration` segment is read by seeking, without decoding the part before it where the
format allows. Multi-channel audio is averaged (NeMo's default) unless one channel is chosen.
Resampling uses soxr at the quality NeMo uses through librosa ("soxr_hq").
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np
import soundfile as sf
import soxr

from runner.errors import AudioLoadError
from runner.timing import timed


@dataclass(frozen=True)
class AudioInfo:
    duration: float  # seconds
    sample_rate: int
    channels: int
    frames: int
    format: str


def audio_info(path: str) -> AudioInfo:
    """Header facts of a file, without decoding it."""
    try:
        info = sf.info(str(path))
    except Exception as exc:  # soundfile raises LibsndfileError, RuntimeError, TypeError...
        raise AudioLoadError(_describe(path, exc)) from None
    return AudioInfo(info.frames / info.samplerate, info.samplerate, info.channels, info.frames, info.format)


def load_audio(
    path: str,
    sample_rate: int,
    offset: float = 0.0,
    duration: float | None = None,
    channel: int | None = None,
    timings: dict | None = None,
) -> np.ndarray:
    """Mono float32 samples of `path` (or of its `offset`..`offset+duration` segment) at `sample_rate`.

    With `timings`, adds the seconds spent decoding (`read`) and resampling (`resample`) to it."""
    with timed(timings, "read"):
        try:
            with sf.SoundFile(str(path)) as f:
                samples, native_rate = _read_segment(f, path, offset, duration)
        except AudioLoadError:
            raise
        except Exception as exc:
            raise AudioLoadError(_describe(path, exc)) from None
        mono = _to_mono(samples, path, channel)
        if not np.isfinite(mono).all():
            bad = int(np.count_nonzero(~np.isfinite(mono)))
            raise AudioLoadError(f"{path}: {bad} samples are NaN or infinite (a broken float file); re-encode it")
    if native_rate != sample_rate and mono.size:
        with timed(timings, "resample"):
            mono = soxr.resample(mono, native_rate, sample_rate, quality="HQ").astype(np.float32, copy=False)
    return np.ascontiguousarray(mono, dtype=np.float32)


def _read_segment(f: sf.SoundFile, path, offset: float, duration: float | None):
    rate = f.samplerate
    start = int(round(max(offset, 0.0) * rate))
    if f.frames and start >= f.frames:
        raise AudioLoadError(
            f"{path}: offset {offset:.3f} s is past the end of the file ({f.frames / rate:.3f} s); "
            "fix the manifest's offset"
        )
    if start:
        f.seek(start)
    count = -1 if duration is None or duration <= 0 else int(round(duration * rate))
    return f.read(frames=count, dtype="float32", always_2d=True), rate


def _to_mono(samples: np.ndarray, path, channel: int | None) -> np.ndarray:
    if channel is None:
        return samples.mean(axis=1) if samples.shape[1] > 1 else samples[:, 0]
    if not -samples.shape[1] <= channel < samples.shape[1]:
        raise AudioLoadError(f"{path}: channel {channel} requested but the file has {samples.shape[1]}")
    return samples[:, channel]


def _describe(path, exc: Exception) -> str:
    if not os.path.exists(path):
        return f"{path}: file not found; check audio_filepath in the manifest"
    if os.path.isdir(path):
        return f"{path}: is a directory, not an audio file; check audio_filepath in the manifest"
    if os.path.getsize(path) == 0:
        return f"{path}: file is empty (0 bytes)"
    reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return f"{path}: cannot decode audio ({reason}); re-encode it as WAV or FLAC"
