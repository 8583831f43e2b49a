"""Long recordings for tests and benchmarks: espeak-ng speech of the demo grammar, one sentence after
another with pauses of varied length between them (as in a talk or a meeting), written as one FLAC.

Pauses are what a splitter looks for; `pause` sets their range in seconds, and `noise` adds a floor of
white noise (its standard deviation), so that a pause is not digital silence.
"""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import soundfile as sf

from runner.training import corpus, demo_corpus
from runner.training.demo_data import PEAK, RATE, trim_silence


def long_recording(
    path: str | Path,
    seconds: float,
    seed: int = 11,
    pause: tuple[float, float] = (0.25, 1.2),
    noise: float = 0.0,
    pauses: list | None = None,
) -> tuple[str, str]:
    """Write >= `seconds` of speech to `path` (16 kHz FLAC); returns (path, reference text). `pauses`, when
    given, gets the (start, end) seconds of every pause between two sentences (after trimming)."""
    rng = random.Random(seed)
    nrng = np.random.default_rng(seed)
    texts = demo_corpus.demo_sentences(int(seconds / 1.5) + 50, seed=seed)
    pieces, refs, total = [], [], 0
    for text in texts:
        voice = demo_corpus.random_demo_voice(rng)
        audio = trim_silence(corpus.synthesize(text, voice, RATE))
        audio = audio * (PEAK / max(float(np.abs(audio).max()), 1e-6))
        gap = np.zeros(int(rng.uniform(*pause) * RATE), np.float32)
        pieces += [audio.astype(np.float32), gap]
        refs.append(text)
        if pauses is not None:
            pauses.append(((total + len(audio)) / RATE, (total + len(audio) + len(gap)) / RATE))
        total += len(audio) + len(gap)
        if total >= seconds * RATE:
            break
    signal = np.concatenate(pieces)
    if noise > 0:
        signal = signal + noise * nrng.standard_normal(signal.shape).astype(np.float32)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    sf.write(path, np.clip(signal, -1, 1), RATE, format="FLAC", subtype="PCM_16")
    return str(path), " ".join(refs)
