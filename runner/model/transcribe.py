"""Audio arrays -> text with the lean model: batching by length, and long files in windows.

`transcribe_batch` is the plain function the Ray workers call (and tests call without Ray).
Files longer than `window_seconds` go through `long_outputs`: the log-mel of the whole file
is computed chunk by chunk (exactly equal to the whole-file features, normalization
statistics included), then the encoder runs over fixed windows that each see
`context_seconds` of neighbouring audio, and the kept output frames are concatenated before
greedy decoding. Memory then grows with the window, not with the file (apart from the
samples and log-mel frames themselves: ~90 KB per second of audio).

`transcribe` also gives each utterance's words with times and confidence (`runner.model.words`)
when handed a `WordAligner`; `transcribe_batch` gives the texts alone.

Given a `timings` dict, both add the seconds they spend per stage: `features` (padding + log-mel),
`encoder` (encoder + decoder conv + log-softmax), `decode` (greedy CTC) and `words` (times and
confidence); results are unchanged.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from runner.model.ctc import LeanModel
from runner.model.decoding import greedy_decode
from runner.model.features import LineNorm, feature_lengths, mask_frames, normalize
from runner.model.words import ConfidenceMethod, WordAligner
from runner.timing import timed


@dataclass(frozen=True)
class DecodeOptions:
    batch_size: int = 8  # utterances per forward pass (sorted by length first)
    window_seconds: float = 40.0  # files longer than this are processed in windows
    context_seconds: float = 5.0  # audio seen on each side of a window, then dropped
    window_batch: int = 2  # windows per forward pass: QuartzNet15x5 peaks at ~550 MB RSS (8: ~900 MB)
    confidence: ConfidenceMethod | None = None  # words with times and confidence by this method; None: text only


def pad_batch(audios: Sequence[np.ndarray]) -> tuple[torch.Tensor, torch.Tensor]:
    lengths = torch.tensor([len(a) for a in audios], dtype=torch.long)
    batch = torch.zeros(len(audios), int(lengths.max()) if len(audios) else 0)
    for i, a in enumerate(audios):
        batch[i, : len(a)] = torch.from_numpy(np.asarray(a, dtype=np.float32))
    return batch, lengths


@dataclass
class Transcript:
    text: str
    words: list[dict] | None = None  # [{word, start, end, confidence}], seconds in the file; None: not asked
    confidence: float | None = None


def transcribe_batch(
    model: LeanModel,
    audios: Sequence[np.ndarray],
    options: DecodeOptions = DecodeOptions(),
    timings: dict | None = None,
) -> list[str]:
    """Transcripts of mono float32 arrays at the model's rate, in input order."""
    return [t.text for t in transcribe(model, audios, options, timings)]


def word_aligner(model: LeanModel, method=None) -> WordAligner:
    """The model's `WordAligner`: frames of window stride x subsampling; confidence by `method`
    (a `ConfidenceMethod`; None: NeMo's defaults)."""
    return WordAligner(model.text_decoder, frame_seconds(model.spec), method or ConfidenceMethod())


def frame_seconds(spec) -> float:
    """Seconds per output frame: window stride x subsampling (what NeMo multiplies frame offsets by)."""
    return spec.features.hop_length / spec.features.sample_rate * spec.encoder.subsampling


@torch.inference_mode()
def transcribe(
    model: LeanModel,
    audios: Sequence[np.ndarray],
    options: DecodeOptions = DecodeOptions(),
    timings: dict | None = None,
    aligner: WordAligner | None = None,
    offsets: Sequence[float] | None = None,
) -> list[Transcript]:
    """`Transcript`s of mono float32 arrays at the model's rate, in input order; with an `aligner`,
    each with its words (times in seconds plus the audio's `offsets`, default 0) and confidence."""
    rate = model.spec.features.sample_rate
    out: list[Transcript | None] = [None] * len(audios)
    offsets = offsets if offsets is not None else [0.0] * len(audios)
    long_ids = {i for i, a in enumerate(audios) if len(a) > options.window_seconds * rate}
    for i in sorted(long_ids):
        outputs = long_outputs(model, audios[i], options, timings).unsqueeze(0)
        out[i] = _decode(model, outputs, torch.tensor([outputs.shape[1]]), [offsets[i]], aligner, timings)[0]
    short = sorted((i for i in range(len(audios)) if i not in long_ids), key=lambda i: len(audios[i]))
    for start in range(0, len(short), options.batch_size):
        ids = short[start : start + options.batch_size]
        with timed(timings, "features"):  # model(batch, lengths) in two steps, to time them apart
            batch, lengths = pad_batch([audios[i] for i in ids])
            feats, frames = model.features(batch, lengths)
        with timed(timings, "encoder"):
            outputs, out_lens = model.forward_features(feats, frames)
        for i, t in zip(ids, _decode(model, outputs, out_lens, [offsets[i] for i in ids], aligner, timings)):
            out[i] = t
    return out


def _decode(model, outputs, lengths, offsets, aligner: WordAligner | None, timings) -> list[Transcript]:
    """Transcripts of per-frame outputs [B, T', X] (CTC log-probabilities or a transducer's projected frames)."""
    if model.head is not None:
        return _decode_transducer(model, outputs, lengths, offsets, aligner, timings)
    log_probs = outputs
    with timed(timings, "decode"):
        texts = greedy_decode(log_probs, lengths, model.text_decoder)
    if aligner is None:
        return [Transcript(text) for text in texts]
    with timed(timings, "words"):
        best = log_probs.argmax(dim=-1)
        conf = aligner.confidences(log_probs)
        out = []
        for b, (text, n, offset) in enumerate(zip(texts, lengths.tolist(), offsets)):
            words, confidence = aligner.words(best[b, :n], None if conf is None else conf[b, :n], offset)
            out.append(Transcript(text, words, confidence))
        return out


def _decode_transducer(model, frames, lengths, offsets, aligner: WordAligner | None, timings) -> list[Transcript]:
    """Greedy transducer decoding (prediction + joint networks, `TransducerHead.greedy`), then words."""
    confidence = aligner is not None and aligner.method is not None
    blanks = aligner.step_confidence if confidence and not aligner.method.exclude_blank else None
    with timed(timings, "decode"):
        hyps = model.head.greedy(frames, lengths, keep_log_probs=confidence, blank_confidence=blanks)
        texts = [model.text_decoder(ids) for ids in hyps.tokens]
    if aligner is None:
        return [Transcript(text) for text in texts]
    tdt = model.spec.transducer.kind == "tdt"
    with timed(timings, "words"):
        out = []
        for b, (text, offset) in enumerate(zip(texts, offsets)):
            words, conf = aligner.transducer_words(
                hyps.tokens[b],
                hyps.frames[b],
                hyps.durations[b] if tdt else None,
                hyps.log_probs[b] if confidence else None,
                offset,
                hyps.blank_confidence[b] if blanks is not None else None,
            )
            out.append(Transcript(text, words, conf))
        return out


@torch.inference_mode()
def long_outputs(
    model: LeanModel,
    audio: np.ndarray,
    options: DecodeOptions,
    timings: dict | None = None,
    norm: LineNorm | None = None,
) -> torch.Tensor:
    """[T', X] per-frame outputs of one long file (CTC log-probabilities or a transducer's projected frames),
    computed in bounded-memory windows; `norm`: normalization statistics to use instead of the file's own
    (a segment of a longer one)."""
    with timed(timings, "features"):
        feats = whole_file_features(model, audio, chunk_frames=6000, norm=norm)
    sub = model.spec.encoder.subsampling
    fps = model.spec.features.sample_rate / model.spec.features.hop_length
    window = max(sub, int(options.window_seconds * fps) // sub * sub)
    context = int(math.ceil(options.context_seconds * fps / sub)) * sub
    total = feats.shape[1]
    spans = [(a, min(a + window, total)) for a in range(0, total, window)]
    pieces = []
    with timed(timings, "encoder"):
        for group in range(0, len(spans), options.window_batch):
            pieces += _encode_windows(model, feats, spans[group : group + options.window_batch], context, sub)
        return torch.cat(pieces, dim=0)


def _encode_windows(model, feats, spans, context, sub) -> list[torch.Tensor]:
    total = feats.shape[1]
    starts = [max(0, a - context) for a, _ in spans]
    ends = [min(total, b + context) for _, b in spans]
    lens = torch.tensor([e - s for s, e in zip(starts, ends)])
    batch = torch.zeros(len(spans), feats.shape[0], int(lens.max()))
    for i, (s, e) in enumerate(zip(starts, ends)):
        batch[i, :, : e - s] = feats[:, s:e]
    outputs, _ = model.forward_features(batch, lens)
    out = []
    for i, ((a, b), s) in enumerate(zip(spans, starts)):
        first, last = (a - s) // sub, (b - s + sub - 1) // sub
        out.append(outputs[i, first:last])
    return out


def whole_file_features(
    model: LeanModel, audio: np.ndarray, chunk_frames: int, norm: LineNorm | None = None
) -> torch.Tensor:
    """Normalized log-mel [n_mels, F] of one file, computed `chunk_frames` frames at a time (with the
    statistics `norm` when given, else the file's own)."""
    cfg = model.features.cfg
    if cfg.exact_pad:  # rare; the chunked STFT below assumes centered frames
        signal = torch.from_numpy(np.asarray(audio, dtype=np.float32))
        return model.features(signal.unsqueeze(0), torch.tensor([signal.numel()]))[0][0]
    x = raw_log_mel(model, audio, chunk_frames).unsqueeze(0)
    frames_t = torch.tensor([x.shape[2]])
    if norm is not None and cfg.normalize in ("per_feature", "all_features"):
        x = norm.apply(x[0]).unsqueeze(0)
    elif cfg.normalize:
        x = normalize(x, frames_t, cfg.normalize)
    return mask_frames(x, frames_t, cfg.pad_value)[0]


def raw_log_mel(model: LeanModel, audio: np.ndarray, chunk_frames: int = 6000) -> torch.Tensor:
    """Log-mel [n_mels, F] of one file before normalization, `chunk_frames` frames at a time; each frame
    as in the whole-file computation (the file's edges padded as NeMo pads them)."""
    mel = model.features
    cfg = mel.cfg
    signal = torch.from_numpy(np.asarray(audio, dtype=np.float32))
    n = torch.tensor([signal.numel()])
    frames = int(feature_lengths(cfg, n)[0])
    half = cfg.n_fft // 2
    chunks = []
    for f0 in range(0, frames, chunk_frames):
        f1 = min(frames, f0 + chunk_frames)
        # Frame f covers samples [f*hop - n_fft/2, f*hop + n_fft/2) of the pre-emphasized signal,
        # which is zero outside the file (NeMo's constant padding and length mask).
        lo, hi = f0 * cfg.hop_length - half, (f1 - 1) * cfg.hop_length + half
        seg = _padded_slice(signal, lo - 1, hi)
        seg = seg[1:] - cfg.preemph * seg[:-1] if cfg.preemph is not None else seg[1:]
        if hi > signal.numel():
            seg[max(0, signal.numel() - lo) :] = 0.0
        chunks.append(mel.spectrum_to_log_mel(mel.stft(seg.unsqueeze(0), center=False))[0])
    return torch.cat(chunks, dim=1)


def _padded_slice(signal: torch.Tensor, lo: int, hi: int) -> torch.Tensor:
    """signal[lo:hi] with zeros where the range runs past either end."""
    out = torch.zeros(hi - lo)
    a, b = max(lo, 0), min(hi, signal.numel())
    if b > a:
        out[a - lo : b - lo] = signal[a:b]
    return out
