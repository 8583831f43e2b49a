"""NeMo's own word timestamps and confidence, the reference `runner.model.words` is checked against
(tests and benchmarks/words_parity.py; driver side only: imports NeMo when called)."""

from __future__ import annotations


def nemo_words(nemo_model, paths: list[str], method) -> list[tuple[list[dict], list[float]]]:
    """NeMo's own word timestamps (`transcribe(timestamps=True)`) and word confidence (its
    `ConfidenceConfig` with `method`, a `runner.model.words.ConfidenceMethod`) of `paths`: per file, the
    words ({word, start_offset, end_offset, start, end}) and their confidence. NeMo 3.0's
    `_aggregate_token_confidence` passes the timestamp path's text where it expects token ids, so the
    words' confidence is aggregated here with NeMo's own functions from NeMo's token confidence."""
    _use_confidence(nemo_model, method)
    hyps = nemo_model.transcribe(paths, batch_size=4, timestamps=True, return_hypotheses=True, verbose=False)
    nemo_model.eval()  # NeMo 3.0's transcribe() leaves the encoder's BatchNorm in training mode
    decoding, out = nemo_model.decoding, []
    for h in hyps[0] if isinstance(hyps, tuple) else hyps:
        words = h.text.split()
        ids, prev = [], None
        for t in h.y_sequence.argmax(-1).tolist():  # the greedy tokens, collapsed
            if t != prev and t != decoding.blank_id:
                ids.append(t)
            prev = t
        if hasattr(nemo_model, "tokenizer"):
            conf = decoding._aggregate_token_confidence_subwords_sentencepiece(words, h.token_confidence, ids)
        elif " ".join(words) == "".join(decoding.vocabulary[i] for i in ids):
            conf = decoding._aggregate_token_confidence_chars(words, h.token_confidence)
        else:  # two spaces in a row, or one at an end: NeMo's function assumes one space per word; group by hand
            chars, conf, run = [decoding.vocabulary[i] for i in ids], [], []
            for c, tc in zip(chars + [" "], h.token_confidence + [None]):
                if c != " ":
                    run.append(tc)
                elif run:
                    conf.append(decoding._aggregate_confidence(run))
                    run = []
        out.append((h.timestamp["word"], conf))
    return out


def word_agreement(theirs: list[tuple[list[dict], list[float]]], ours, frame_seconds: float) -> dict:
    """How far our `Transcript`s' words are from NeMo's (`nemo_words`): word lists that differ, words
    with identical start/end frames, and the largest confidence difference."""
    words = same_frames = differ = 0
    conf_diff = 0.0
    for (their_words, their_conf), mine in zip(theirs, ours, strict=True):
        if [w["word"] for w in their_words] != [w["word"] for w in mine.words]:
            differ += 1
            continue
        for w, c, m in zip(their_words, their_conf, mine.words):
            words += 1
            same_frames += (
                round(m["start"] / frame_seconds) == w["start_offset"]
                and round(m["end"] / frame_seconds) == w["end_offset"]
            )
            conf_diff = max(conf_diff, abs(c - m["confidence"]))
    return {
        "utterances_differ": differ,
        "words": words,
        "same_frames": int(same_frames),
        "max_confidence_diff": float(conf_diff),
    }


def compare_with_nemo(nemo_model, lean, paths: list[str], method) -> tuple[dict, list]:
    """NeMo's words of `paths` (`nemo_words`) against the lean model's with the same confidence `method`,
    batched by 4 as NeMo's: `word_agreement`'s figures (with the frame step) and the lean `Transcript`s."""
    from runner.inputs.audio import load_audio
    from runner.model.transcribe import DecodeOptions, transcribe, word_aligner

    theirs = nemo_words(nemo_model, paths, method)
    aligner = word_aligner(lean, method)
    audios = [load_audio(p, lean.spec.features.sample_rate) for p in paths]
    ours = transcribe(lean, audios, DecodeOptions(batch_size=4), aligner=aligner)
    return {**word_agreement(theirs, ours, aligner.frame_seconds), "frame_seconds": aligner.frame_seconds}, ours


def nemo_transducer_token_confidence(nemo_model, audios, method, batch_size: int = 4) -> list[dict]:
    """NeMo's own token confidence of a transducer (greedy_batch, `ConfidenceConfig` with `method`, a
    `runner.model.words.ConfidenceMethod`): per utterance its `tokens`, their `frames` and `confidence`
    (Hypothesis.token_confidence). `exclude_blank: false` makes NeMo record every step; its TDT branch
    reads the steps' labels from the alignments, so they are kept too."""
    import numpy as np

    tdt = bool(nemo_model.cfg.decoding.get("durations"))
    _use_confidence(nemo_model, method, frame_confidence=True, alignments=not method.exclude_blank and tdt)
    audio = [np.asarray(a, dtype=np.float32) for a in audios]
    hyps = nemo_model.transcribe(audio, batch_size=batch_size, return_hypotheses=True, verbose=False)
    nemo_model.eval()
    out = []
    for h in hyps[0] if isinstance(hyps, tuple) else hyps:
        steps = h.timestamp["timestep"] if isinstance(h.timestamp, dict) else h.timestamp
        out.append(
            {
                "tokens": [int(t) for t in h.y_sequence],
                "frames": [int(t) for t in steps],
                "confidence": [float(c) for c in h.token_confidence],
            }
        )
    return out


def _use_confidence(nemo_model, method, frame_confidence: bool = False, alignments: bool | None = None) -> None:
    """Set NeMo's decoding to compute token confidence with `method` (and keep its frame confidence, or its
    alignments, when asked: None leaves the alignments setting as it is)."""
    from nemo.collections.asr.parts.utils.asr_confidence_utils import ConfidenceConfig, ConfidenceMethodConfig
    from omegaconf import OmegaConf, open_dict

    dec = nemo_model.cfg.decoding
    with open_dict(dec):
        if alignments is not None:
            dec.preserve_alignments = alignments
        dec.confidence_cfg = OmegaConf.structured(
            ConfidenceConfig(
                preserve_frame_confidence=frame_confidence,
                preserve_token_confidence=True,
                exclude_blank=method.exclude_blank,
                aggregation=method.aggregation,
                method_cfg=ConfidenceMethodConfig(
                    name=method.method,
                    entropy_type=method.entropy_type,
                    alpha=method.alpha,
                    entropy_norm=method.entropy_norm,
                ),
            )
        )
    nemo_model.change_decoding_strategy(dec, verbose=False)
