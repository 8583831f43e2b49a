"""The demo set's audio: espeak-ng speech trimmed and levelled, written as FLAC with a NeMo manifest per
split, and read back (`runner.training.demo_recipe`)."""

from __future__ import annotations

import json
import logging
import random
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import soundfile as sf

from runner.training import corpus, demo_corpus

log = logging.getLogger("runner.training.demo_recipe")

RATE = 16000
PEAK = 0.3  # peak level of the bundled FLACs: quieter files compress better (~39 KB per utterance)


def trim_silence(audio: np.ndarray, pad: float = 0.15, threshold: float = 0.01) -> np.ndarray:
    """`audio` without leading/trailing silence beyond `pad` seconds."""
    loud = np.flatnonzero(np.abs(audio) > threshold)
    if loud.size == 0:
        return audio
    keep = int(pad * RATE)
    return audio[max(0, loud[0] - keep) : min(len(audio), loud[-1] + keep)]


def synthesize_split(
    texts: Sequence[str], seed: int, max_seconds: float | None = None, log_every: int = 2000
) -> tuple[list[str], list[np.ndarray], list[corpus.Voice]]:
    """(texts, int16 audio, voices) for `texts` (stopping after `max_seconds` of audio), one espeak-ng
    process at a time, voices drawn reproducibly from `seed`."""
    rng = random.Random(seed)
    out_texts, audios, voices = [], [], []
    total, start = 0, time.monotonic()
    for i, text in enumerate(texts):
        voice = demo_corpus.random_demo_voice(rng)
        audio = trim_silence(corpus.synthesize(text, voice, RATE))
        audios.append(np.clip(np.round(audio * 32767), -32768, 32767).astype(np.int16))
        out_texts.append(text)
        voices.append(voice)
        total += len(audio)
        if log_every and (i + 1) % log_every == 0:
            log.info("synthesized %d utterances, %.2f h (%.0f s)", i + 1, total / RATE / 3600, time.monotonic() - start)
        if max_seconds and total >= max_seconds * RATE:
            break
    return out_texts, audios, voices


def write_split(folder: Path, name: str, texts: Sequence[str], audios: Sequence[np.ndarray]) -> Path:
    """`folder/name/uttNNNN.flac` (16 kHz mono, peak `PEAK`) and `folder/name.jsonl` (relative paths)."""
    sub = folder / name
    sub.mkdir(parents=True, exist_ok=True)
    for old in sub.glob("utt*.flac"):
        old.unlink()
    manifest = folder / f"{name}.jsonl"
    with open(manifest, "w", encoding="utf-8") as f:
        for i, (text, audio) in enumerate(zip(texts, audios), 1):
            x = audio.astype(np.float32) / 32768.0
            x = x * (PEAK / max(float(np.abs(x).max()), 1e-6))
            rel = f"{name}/utt{i:04d}.flac"
            sf.write(folder / rel, x, RATE, format="FLAC", subtype="PCM_16", compression_level=1.0)
            f.write(json.dumps({"audio_filepath": rel, "duration": round(len(x) / RATE, 3), "text": text}) + "\n")
    return manifest


def read_manifest(path: Path) -> tuple[list[str], list[np.ndarray]]:
    """(texts, float32 audio) of a manifest, audio read back from its files."""
    from runner.inputs.audio import load_audio
    from runner.inputs.manifest import iter_manifest

    texts, audios = [], []
    for item in iter_manifest(path):
        texts.append(item.text or "")
        audios.append(load_audio(item.audio_filepath, RATE))
    return texts, audios


def du_bytes(folder: Path) -> int:
    """Disk usage of a folder (allocated blocks, as `du` counts them)."""
    return sum(p.stat().st_blocks * 512 for p in folder.rglob("*") if p.is_file())
