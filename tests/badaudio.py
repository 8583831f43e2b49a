"""The bad-audio matrix (issue 6): files that break readers in the field, generated on the spot.

`make_bad_audio(folder, speech, long_speech)` writes each case and returns manifest rows with
the outcome a transcription tool should give: `error` (an error row naming the id and the
file), or status ok with `ok` (the speech is heard: `text` is its reference), `partial` (the
`duration` segment only), `empty` (no words), `any` (too short to judge), `narrowband` (8 kHz: a
16 kHz model hears it worse), `long` (>= 20 min).
"""

from __future__ import annotations

import numpy as np
import soundfile as sf
import soxr

RATE = 16000


def make_bad_audio(folder, speech: tuple[str, np.ndarray], long_speech: tuple[str, np.ndarray]) -> list[dict]:
    """Rows: {"case", "audio_filepath" (relative to `folder`), manifest keys..., "expect"}."""
    text, audio = speech
    folder.mkdir(parents=True, exist_ok=True)
    wav = folder / "clean.wav"
    sf.write(wav, audio, RATE, subtype="PCM_16")
    rows = []

    def case(name, filename, expect, data=None, **keys):
        if data is not None:
            (folder / filename).write_bytes(data) if isinstance(data, bytes) else data(folder / filename)
        rows.append(
            {
                "case": name,
                "audio_filepath": filename,
                "text": text if expect == "ok" else None,
                "expect": expect,
                **keys,
            }
        )

    def write(rate=RATE, channels=1, subtype="PCM_16", fmt=None, samples=audio):
        def writer(path):
            data = soxr.resample(samples, RATE, rate) if rate != RATE else samples
            if channels == 2:
                data = np.stack([data, 0.5 * data], axis=1)
            sf.write(path, data, rate, subtype=subtype, format=fmt)

        return writer

    seconds = len(audio) / RATE
    case("missing file", "does-not-exist.wav", "error")
    case("0-byte file", "empty.wav", "error", b"")
    case("truncated header", "cut-header.wav", "error", wav.read_bytes()[:30])
    case("truncated data (header says more)", "cut-data.wav", "ok", wav.read_bytes()[: len(wav.read_bytes()) - 2000])
    case("random bytes named .wav", "noise-bytes.wav", "error", np.random.default_rng(0).bytes(20000))
    case("text file named .flac", "notes.flac", "error", b"this is not audio, just some text\n" * 50)
    case("directory as audio_filepath", "a-folder.wav", "error", lambda path: path.mkdir(exist_ok=True))
    case("offset past the end", "clean.wav", "error", offset=round(seconds + 5, 3), duration=2.0)
    case("duration longer than the file", "clean.wav", "ok", duration=round(seconds + 30, 3))
    case("duration shorter than the file", "clean.wav", "partial", duration=round(seconds / 2, 3))
    case("silence (3 s)", "silence.wav", "empty", write(samples=np.zeros(3 * RATE, np.float32)))
    case("0.05 s of audio", "short.wav", "any", write(samples=audio[RATE // 2 : RATE // 2 + RATE // 20]))
    case(
        "NaN samples (float WAV)",
        "nan.wav",
        "error",
        write(subtype="FLOAT", samples=np.where(np.arange(len(audio)) % 997 == 0, np.nan, audio).astype(np.float32)),
    )
    case("8 kHz", "rate-8k.wav", "narrowband", write(rate=8000))
    case("48 kHz stereo", "rate-48k-stereo.wav", "ok", write(rate=48000, channels=2))
    case("24-bit WAV", "pcm24.wav", "ok", write(subtype="PCM_24"))
    case("float WAV", "float.wav", "ok", write(subtype="FLOAT"))
    case("OGG Vorbis", "vorbis.ogg", "ok", write(rate=44100, subtype="VORBIS"))
    case("MP3", "speech.mp3", "ok", write(rate=22050, subtype="MPEG_LAYER_III"))
    case(
        "spaces and non-ASCII in the path",
        "dossier ünïcødé/la phrase – 語.flac",
        "ok",
        lambda path: (path.parent.mkdir(exist_ok=True), write()(path)),
    )
    long_text, long_audio = long_speech
    case(f"{len(long_audio) / RATE / 60:.0f}-minute file", "long.flac", "long", write(samples=long_audio))
    rows[-1]["text"] = long_text
    return rows
