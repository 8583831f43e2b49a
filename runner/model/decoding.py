"""Greedy CTC decoding: best class per frame, merge repeats, drop blanks (NeMo's `greedy`).

Token ids become text through a `TextDecoder`: character vocabularies join their tokens as they
are; subword models (Citrinet's `EncDecCTCModelBPE`) go through the real `sentencepiece`
library with the tokenizer model shipped in the spec, as NeMo's `SentencePieceTokenizer.ids_to_text`
does. A model builds its `TextDecoder` once (`model.text_decoder`), not per utterance.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from runner.model.arch import ModelSpec


def greedy_ids(log_probs: torch.Tensor, lengths: torch.Tensor, blank_id: int) -> list[list[int]]:
    """log-probs [B, T, C], frame counts [B] -> token ids per utterance."""
    best = log_probs.argmax(dim=-1)
    return [collapse(row[: int(n)], blank_id) for row, n in zip(best, lengths.tolist())]


def collapse(best: torch.Tensor, blank_id: int) -> list[int]:
    """The best class of each frame [T] -> token ids: repeats merged, blanks dropped."""
    if best.numel() == 0:
        return []
    keep = torch.ones_like(best, dtype=torch.bool)
    keep[1:] = best[1:] != best[:-1]
    return [t for t in best[keep].tolist() if t != blank_id]


def ids_to_text(ids: Sequence[int], vocabulary: Sequence[str]) -> str:
    """Character vocabularies: tokens are joined as they are (the space is a token)."""
    return "".join(vocabulary[i] for i in ids)


class TextDecoder:
    """Token ids -> text for one model: its vocabulary (blank = its length) and, for subword models,
    its SentencePiece model (loaded on first use; pickles and copies without the loaded processor)."""

    def __init__(self, vocabulary: Sequence[str], sentencepiece_model: bytes | None = None):
        self.vocabulary = tuple(vocabulary)
        self.blank_id = len(self.vocabulary)
        self._model = sentencepiece_model
        self._processor = None

    @classmethod
    def from_spec(cls, spec: ModelSpec) -> TextDecoder:
        tok = spec.tokenizer
        if tok is not None and tok.kind != "sentencepiece":
            raise ValueError(f"tokenizer kind {tok.kind!r} is not supported (supported: sentencepiece)")
        return cls(spec.vocabulary, tok.model_bytes() if tok is not None else None)

    @property
    def is_subword(self) -> bool:
        return self._model is not None

    def piece(self, i: int) -> str:
        """Token `i` as the vocabulary spells it (`▁the` for a SentencePiece piece)."""
        return self.processor.id_to_piece(i) if self._model is not None else self.vocabulary[i]

    def pieces_text(self, pieces: Sequence[str]) -> str:
        """Pieces -> text (NeMo's `tokens_to_text`: SentencePiece's `decode_pieces`; characters joined)."""
        return self.processor.decode_pieces(list(pieces)) if self._model is not None else "".join(pieces)

    def __call__(self, ids: Sequence[int]) -> str:
        if self._model is None:
            return ids_to_text(ids, self.vocabulary)
        return self.processor.decode_ids(list(ids))

    @property
    def processor(self):
        """The SentencePieceProcessor, built once (imported only for subword models)."""
        if self._processor is None:
            import sentencepiece

            self._processor = sentencepiece.SentencePieceProcessor(model_proto=self._model)
            if self._processor.get_piece_size() != len(self.vocabulary):
                raise ValueError(
                    f"the tokenizer has {self._processor.get_piece_size()} pieces but the model "
                    f"{len(self.vocabulary)} output classes (+ blank); the spec is inconsistent"
                )
        return self._processor

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_processor": None}


def greedy_decode(log_probs: torch.Tensor, lengths: torch.Tensor, text: TextDecoder | Sequence[str]) -> list[str]:
    """Transcripts of a batch; `text` is the model's `TextDecoder` (or a character vocabulary)."""
    if not isinstance(text, TextDecoder):
        text = TextDecoder(text)
    return [text(ids) for ids in greedy_ids(log_probs, lengths, text.blank_id)]
