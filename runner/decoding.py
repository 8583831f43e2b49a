"""Greedy CTC decoding: best class per frame, merge repeats, drop blanks (NeMo's `greedy`)."""

from __future__ import annotations

from typing import Sequence

import torch


def greedy_ids(log_probs: torch.Tensor, lengths: torch.Tensor, blank_id: int) -> list[list[int]]:
    """log-probs [B, T, C], frame counts [B] -> token ids per utterance."""
    best = log_probs.argmax(dim=-1)
    out = []
    for row, n in zip(best, lengths.tolist()):
        row = row[: int(n)]
        if row.numel() == 0:
            out.append([])
            continue
        keep = torch.ones_like(row, dtype=torch.bool)
        keep[1:] = row[1:] != row[:-1]
        out.append([t for t in row[keep].tolist() if t != blank_id])
    return out


def ids_to_text(ids: Sequence[int], vocabulary: Sequence[str]) -> str:
    """Character vocabularies: tokens are joined as they are (the space is a token)."""
    return "".join(vocabulary[i] for i in ids)


def greedy_decode(log_probs: torch.Tensor, lengths: torch.Tensor, vocabulary: Sequence[str]) -> list[str]:
    blank = len(vocabulary)
    return [ids_to_text(ids, vocabulary) for ids in greedy_ids(log_probs, lengths, blank)]
