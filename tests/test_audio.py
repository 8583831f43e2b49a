"""Audio input: formats, rates, channels, segments and clear errors."""

import numpy as np
import pytest
import soundfile as sf

from runner.errors import AudioLoadError
from runner.inputs.audio import audio_info, load_audio

RATE = 16000


def tone(seconds=1.0, rate=RATE, freq=440.0, channels=1):
    t = np.arange(int(seconds * rate)) / rate
    mono = (0.5 * np.sin(2 * np.pi * freq * t)).astype(np.float32)
    return mono if channels == 1 else np.stack([mono * (c + 1) / channels for c in range(channels)], axis=1)


@pytest.mark.parametrize(
    "fmt,subtype,tol",
    [
        ("WAV", "PCM_16", 1e-4),
        ("WAV", "PCM_24", 1e-6),
        ("WAV", "FLOAT", 0),
        ("FLAC", "PCM_16", 1e-4),
        ("OGG", "VORBIS", None),
        ("MP3", "MPEG_LAYER_III", None),
    ],
)
def test_formats_read_as_mono_float32(tmp_path, fmt, subtype, tol):
    path = tmp_path / f"a.{fmt.lower()}"
    ref = tone(1.0)
    sf.write(path, ref, RATE, format=fmt, subtype=subtype)
    got = load_audio(str(path), RATE)
    assert got.dtype == np.float32 and got.ndim == 1
    if tol is not None:
        assert len(got) == len(ref) and np.abs(got - ref).max() <= tol + 1e-7
    else:  # lossy codecs: same length within a frame and the same tone
        assert abs(len(got) - len(ref)) < 2400
        n = min(len(got), len(ref))
        assert np.corrcoef(got[1000 : n - 1000], ref[1000 : n - 1000])[0, 1] > 0.9


@pytest.mark.parametrize("rate", [8000, 22050, 44100, 48000])
def test_resampled_to_model_rate(tmp_path, rate):
    path = tmp_path / "a.wav"
    sf.write(path, tone(2.0, rate), rate, subtype="PCM_16")
    got = load_audio(str(path), RATE)
    assert abs(len(got) - 2 * RATE) <= 1
    assert np.abs(got[2000:-2000] - tone(2.0)[2000:-2000][: len(got) - 4000]).max() < 0.02


def test_stereo_is_averaged_or_one_channel_chosen(tmp_path):
    path = tmp_path / "st.wav"
    sf.write(path, tone(1.0, channels=2), RATE, subtype="FLOAT")
    mono = tone(1.0)
    assert np.allclose(load_audio(str(path), RATE), mono * 0.75, atol=1e-6)
    assert np.allclose(load_audio(str(path), RATE, channel=1), mono, atol=1e-6)
    with pytest.raises(AudioLoadError, match="channel 2 requested but the file has 2"):
        load_audio(str(path), RATE, channel=2)


@pytest.mark.parametrize("fmt", ["wav", "flac", "mp3"])
def test_offset_and_duration_read_a_segment(tmp_path, fmt):
    ramp = (np.arange(5 * RATE) / (5 * RATE) - 0.5).astype(np.float32)
    path = tmp_path / f"r.{fmt}"
    sf.write(path, ramp, RATE)
    seg = load_audio(str(path), RATE, offset=1.5, duration=2.0)
    assert abs(len(seg) - 2 * RATE) <= (1152 if fmt == "mp3" else 0)
    if fmt != "mp3":
        assert np.allclose(seg, ramp[int(1.5 * RATE) : int(3.5 * RATE)], atol=1e-4)
    tail = load_audio(str(path), RATE, offset=4.0)
    assert abs(len(tail) - RATE) <= (1152 if fmt == "mp3" else 0)


def test_errors_name_the_file_and_what_to_do(tmp_path):
    with pytest.raises(AudioLoadError, match="missing.wav: file not found"):
        load_audio(str(tmp_path / "missing.wav"), RATE)
    (tmp_path / "empty.wav").write_bytes(b"")
    with pytest.raises(AudioLoadError, match=r"empty.wav: file is empty \(0 bytes\)"):
        load_audio(str(tmp_path / "empty.wav"), RATE)
    (tmp_path / "junk.flac").write_text("this is not audio\n" * 20)
    with pytest.raises(AudioLoadError, match="junk.flac: cannot decode audio .*re-encode"):
        load_audio(str(tmp_path / "junk.flac"), RATE)
    sf.write(tmp_path / "short.wav", tone(1.0), RATE)
    with pytest.raises(AudioLoadError, match="offset 3.000 s is past the end of the file"):
        load_audio(str(tmp_path / "short.wav"), RATE, offset=3.0)


def test_audio_info_reads_the_header(tmp_path):
    path = tmp_path / "i.flac"
    sf.write(path, tone(1.25, 22050, channels=2), 22050)
    info = audio_info(str(path))
    assert (info.sample_rate, info.channels, info.frames) == (22050, 2, int(1.25 * 22050))
    assert info.duration == pytest.approx(int(1.25 * 22050) / 22050)
