"""Every int8 model proves its arithmetic on the CPU that runs it, before it transcribes.

int8 is not the same computation on every CPU (x86 without VNNI saturates 8-bit activations;
a cluster may mix CPUs; an engine may have a bug), so the accuracy gate on the driver's CPU
cannot vouch for a worker's. The artifact carries a small fp32 reference made once on the
driver (`runner.int8.gate.GateSet.reference`): the features of a few held-out gate utterances, the fp32 model's
logits on them, and the figures the driver's own int8 model reached on them, per activation
bit width (`expected`). A worker runs the same features through its int8 model (`check`) and
compares with the fp32 logits: per-frame logit cosine, greedy frame agreement and the WER of
its transcripts against fp32's. It passes when cosine and frame agreement are within
`COSINE_MARGIN` / `AGREEMENT_MARGIN` of what the driver reached (engines differ in rounding, a
few 1e-4 of cosine; saturation costs tenths).

What happens when a check fails is `runner.int8.artifact.build_int8_model`'s (7-bit activations next)
and `runner.job.worker.ShardWorker`'s (the fp32 model, or stop the job) business.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from runner.int8.model import attention_matmuls
from runner.metrics import normalize_text, wer

REFERENCE_SECONDS = 20.0  # audio the reference holds (a check costs one int8 pass over it)
REFERENCE_ITEMS = 4
COSINE_MARGIN = 0.001  # a worker may be this far below the driver's logit cosine
AGREEMENT_MARGIN = 0.02  # ... and this far below its frame agreement

Logits = Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


def logit_figures(a: torch.Tensor, b: torch.Tensor, lens: torch.Tensor) -> dict:
    """Sums over the valid frames of two [B, C, T] logit tensors: squared error and reference energy,
    per-frame cosine, argmax agreement, and the frame count (`summarize` turns them into figures)."""
    valid = torch.arange(a.shape[-1]).unsqueeze(0) < lens.unsqueeze(1)  # [B, T]
    return {
        "error": float((a - b).pow(2).sum(1)[valid].sum()),
        "energy": float(b.pow(2).sum(1)[valid].sum()),
        "cosine": float(torch.nn.functional.cosine_similarity(a, b, dim=1)[valid].sum()),
        "agree": int((a.argmax(1) == b.argmax(1))[valid].sum()),
        "frames": int(valid.sum()),
    }


def summarize(sums: Sequence[dict]) -> dict:
    """`logit_error` (relative squared error), `logit_cosine` and `frame_agreement` (fractions)."""
    total = {k: sum(s[k] for s in sums) for k in ("error", "energy", "cosine", "agree", "frames")}
    frames = max(total["frames"], 1)
    return {
        "logit_error": total["error"] / max(total["energy"], 1e-12),
        "logit_cosine": total["cosine"] / frames,
        "frame_agreement": total["agree"] / frames,
    }


def texts(logits: torch.Tensor, lens: torch.Tensor, reader) -> list[str]:
    """Normalized greedy transcripts of a model's [B, X, T] logits (`reader`: its `LogitReader`)."""
    return [normalize_text(t) for t in reader.texts(reader.outputs(logits), lens)]


def compared(a: torch.Tensor, b: torch.Tensor, lens: torch.Tensor, reader) -> dict:
    """`logit_figures` of two models' logits on the classes (a transducer's: its joint at the start symbol)."""
    if reader.head is None:
        return logit_figures(a, b, lens)
    return logit_figures(reader.class_logits(a), reader.class_logits(b), lens)


@torch.inference_mode()
def measure(run: Logits, reference: dict, reader) -> dict:
    """Figures of an int8 model's logits (`run(feats, frames)`) against the reference's fp32 logits."""
    out, lens = run(reference["features"], reference["frames"])
    figures = summarize([compared(out, reference["logits"], reference["lengths"], reader)])
    fp32_texts = reference.get("texts") or texts(reference["logits"], reference["lengths"], reader)  # older artifacts
    figures["wer_vs_fp32"] = wer(fp32_texts, texts(out, lens, reader))
    return {k: round(v, 6) for k, v in figures.items()}


def expected(reference: dict, bits: int) -> dict | None:
    """What the driver's int8 model reached at `bits` (else at the other width it measured)."""
    known = reference.get("expected", {})
    return known.get(bits) or next(iter(known.values()), None)


def passes(figures: dict, target: dict | None) -> bool:
    if target is None:  # nothing measured on the driver: hold the worker to the gate's usual quality
        target = {"logit_cosine": 0.999, "frame_agreement": 0.99}
    return (
        figures["logit_cosine"] >= target["logit_cosine"] - COSINE_MARGIN
        and figures["frame_agreement"] >= target["frame_agreement"] - AGREEMENT_MARGIN
    )


def depthwise_convs(model) -> str:
    """What the conv family's int8 depthwise convs run on: `runner-avx2` (our kernel, CPUs without VNNI,
    `runner.int8.depthwise`) or the engine's name."""
    return getattr(model.qencoder, "depthwise_convs", None) or model.engine


def check(model, reference: dict) -> dict:
    """The self-check of an int8 model (`Int8Model`): its figures, engine, activation bits and verdict."""
    bits = model.qencoder.activation_bits
    figures = measure(model.logits, reference, model.reader)
    target = expected(reference, bits)
    attention = attention_matmuls(model.qencoder)  # Conformers: float32, or bfloat16 on CPUs with bf16
    family = {"attention_matmuls": attention} if attention is not None else {"depthwise_convs": depthwise_convs(model)}
    return {
        "engine": model.engine,
        "activation_bits": bits,
        **family,
        **figures,
        "passed": passes(figures, target),
        "expected": None if target is None else {k: target[k] for k in ("logit_cosine", "frame_agreement")},
    }
