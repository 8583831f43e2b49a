"""Training the demo model: length-bucketed batches, the augmentation applied to each batch, the learning-rate
schedule, and transcription with the NeMo model being trained (`runner.training.demo_recipe`)."""

from __future__ import annotations

import math
import random
from collections.abc import Sequence

import numpy as np
import torch

from runner.training.demo_data import RATE


def bucketed_batches(lengths: Sequence[int], batch_samples: int, rng: random.Random) -> list[list[int]]:
    """Index batches of similar length whose padded size (count x longest) stays under `batch_samples`,
    in random order; the jitter on the sort key varies the batches from epoch to epoch."""
    order = sorted(range(len(lengths)), key=lambda i: lengths[i] * (1.0 + 0.1 * rng.random()))
    batches, cur, longest = [], [], 0
    for i in order:
        if cur and max(longest, lengths[i]) * (len(cur) + 1) > batch_samples:
            batches.append(cur)
            cur, longest = [], 0
        cur.append(i)
        longest = max(longest, lengths[i])
    if cur:
        batches.append(cur)
    rng.shuffle(batches)
    return batches


def augmented_batch(
    audios: Sequence[np.ndarray], nrng: np.random.Generator, noise_fraction: float = 0.35, max_shift: float = 0.25
) -> tuple[torch.Tensor, torch.Tensor]:
    """Float batch from int16 audio: random gain (peak 0.1-0.95), Gaussian noise on `noise_fraction` of
    the utterances (SNR roughly 20-45 dB), a random start shift of up to `max_shift` seconds."""
    pieces = []
    for a in audios:
        x = a.astype(np.float32) / 32768.0
        x *= nrng.uniform(0.1, 0.95) / max(float(np.abs(x).max()), 1e-6)
        if nrng.random() < noise_fraction:
            x += (
                float(np.exp(nrng.uniform(np.log(0.002), np.log(0.03))))
                * np.abs(x).max()
                * nrng.standard_normal(len(x)).astype(np.float32)
            )
        shift = int(nrng.uniform(0, max_shift) * RATE)
        pieces.append(np.concatenate([np.zeros(shift, np.float32), x]))
    lengths = torch.tensor([len(p) for p in pieces])
    batch = torch.zeros(len(pieces), int(lengths.max()))
    for i, p in enumerate(pieces):
        batch[i, : len(p)] = torch.from_numpy(p)
    return batch, lengths


def lr_at(progress: float, peak: float, warmup: float = 0.05, floor: float = 0.02) -> float:
    """Linear warm-up from peak/25 over `warmup` of the run, then cosine down to `floor` x peak."""
    if progress < warmup:
        return peak * (0.04 + 0.96 * progress / warmup)
    p = min(1.0, (progress - warmup) / (1.0 - warmup))
    return peak * (floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * p)))


@torch.inference_mode()
def nemo_transcribe(model, audios: Sequence[np.ndarray], batch_size: int = 16) -> list[str]:
    """Greedy CTC transcripts of float32 or int16 arrays with the NeMo model (eval mode)."""
    from runner.model.decoding import greedy_decode
    from runner.model.nemo_loader import text_decoder

    was_training = model.training
    model.eval()
    vocab = text_decoder(model)  # characters, or the model's SentencePiece tokenizer
    order = sorted(range(len(audios)), key=lambda i: len(audios[i]))
    out = [""] * len(audios)
    for start in range(0, len(order), batch_size):
        ids = order[start : start + batch_size]
        xs = [audios[i].astype(np.float32) / (32768.0 if audios[i].dtype == np.int16 else 1.0) for i in ids]
        lengths = torch.tensor([len(x) for x in xs])
        batch = torch.zeros(len(xs), int(lengths.max()))
        for j, x in enumerate(xs):
            batch[j, : len(x)] = torch.from_numpy(x)
        log_probs, enc_lengths, _ = model(input_signal=batch, input_signal_length=lengths)
        for i, text in zip(ids, greedy_decode(log_probs, enc_lengths, vocab)):
            out[i] = text
    model.train(was_training)
    return out
