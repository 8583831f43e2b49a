"""Reproducible synthetic English speech with espeak-ng: sentences, voices, speeds, pitches.

Used to make training, calibration and test audio without downloading anything. Everything
is seeded: the same seed gives the same sentences, voices and audio.
"""

from __future__ import annotations

import io
import random
import shutil
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import soundfile as sf
import soxr

VOICES = ("en-us", "en-gb", "en-us+f3", "en-us+m3", "en-gb+f2", "en+m1", "en-us+f4", "en-029")

# fmt: off
_SUBJECTS = ("the cat", "a small dog", "my brother", "the old man", "her friend", "the teacher",
             "a young girl", "the driver", "our neighbor", "the farmer", "his mother", "the doctor")
_VERBS = ("sees", "finds", "likes", "takes", "brings", "wants", "opens", "paints", "cleans",
          "moves", "holds", "buys", "reads", "needs", "sells", "draws")
_OBJECTS = ("the red box", "a green apple", "the big house", "a long letter", "the blue car",
            "some fresh bread", "the heavy door", "a warm coat", "the white horse", "a new book",
            "the black chair", "a little boat", "the yellow kite", "some cold water")
_PLACES = ("in the garden", "near the river", "at the market", "after dinner", "before noon",
           "on the hill", "by the window", "in the morning", "under the bridge", "at school")
# fmt: on


def sentences(count: int, seed: int) -> list[str]:
    """`count` distinct simple English sentences, lowercase, letters, spaces and apostrophes."""
    rng = random.Random(seed)
    out, seen = [], set()
    while len(out) < count:
        parts = [rng.choice(_SUBJECTS), rng.choice(_VERBS), rng.choice(_OBJECTS)]
        if rng.random() < 0.5:
            parts.append(rng.choice(_PLACES))
        text = " ".join(parts)
        if text not in seen:
            seen.add(text)
            out.append(text)
    return out


@dataclass(frozen=True)
class Voice:
    name: str = "en-us"
    speed: int = 160  # words per minute
    pitch: int = 50  # 0..99


def random_voice(rng: random.Random) -> Voice:
    return Voice(rng.choice(VOICES), rng.randint(130, 190), rng.randint(30, 70))


def espeak_available() -> bool:
    return shutil.which("espeak-ng") is not None


def synthesize(text: str, voice: Voice = Voice(), sample_rate: int = 16000) -> np.ndarray:
    """Mono float32 speech for `text` at `sample_rate` (espeak-ng speaks at 22,050 Hz)."""
    cmd = ["espeak-ng", "-v", voice.name, "-s", str(voice.speed), "-p", str(voice.pitch), "--stdout", text]
    wav = subprocess.run(cmd, check=True, capture_output=True).stdout
    audio, rate = sf.read(io.BytesIO(wav), dtype="float32")
    if rate != sample_rate:
        audio = soxr.resample(audio, rate, sample_rate, quality="HQ").astype(np.float32)
    return audio


def synthesize_many(
    texts: list[str], seed: int, sample_rate: int = 16000, noise: float = 0.0
) -> Iterator[tuple[str, Voice, np.ndarray]]:
    """(text, voice, audio) for each text, voices drawn reproducibly from `seed`."""
    rng = random.Random(seed)
    nrng = np.random.default_rng(seed)
    for text in texts:
        voice = random_voice(rng)
        audio = synthesize(text, voice, sample_rate)
        if noise > 0:
            audio = audio + noise * nrng.standard_normal(audio.shape).astype(np.float32)
        yield text, voice, audio


# --- The demo corpus: a richer, still simple English, for the bundled demo model --------------------
#
# A few hundred common words across statement, question, number, time, color and contraction
# templates. Homophone pairs are mostly avoided (no "their", "knew", "sea", "ate", "won", "hour"...),
# since a character CTC model without a language model cannot tell them apart.
