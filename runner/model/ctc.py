"""The lean model: NeMo's CTC models (conv family and Conformers) and transducers (FastConformer
RNN-T/TDT) rebuilt from plain torch modules.

Built from a `ModelSpec`, it never imports NeMo, so a worker starts in about a second. The encoder
comes from `runner.model.conv` or `runner.model.conformer`; the checkpoint format written here is what
workers receive for fp32 jobs and fallbacks.
"""

from __future__ import annotations

import io
import os

import torch
from torch import nn

from runner.model.arch import ModelSpec
from runner.model.conv import ConvEncoder
from runner.model.decoding import TextDecoder, greedy_decode
from runner.model.features import MelFeatures
from runner.model.transducer import FrameLinear, TransducerHead

CHECKPOINT_FORMAT = "asr-runner/lean-ctc/1"


def make_encoder(spec: ModelSpec) -> nn.Module:
    """The encoder for the spec's family: ConvEncoder (QuartzNet/Jasper) or the lean Conformer."""
    if spec.family == "conformer-ctc":
        from runner.model.conformer import ConformerEncoder

        return ConformerEncoder(spec.encoder)
    return ConvEncoder(spec)


def make_decoder(spec: ModelSpec, channels: int) -> nn.Module:
    """CTC: the 1x1 conv to the classes. Transducer: the joint's encoder projection (run once per frame)."""
    if spec.transducer is not None:
        return FrameLinear(channels, spec.transducer.joint_hidden)
    return nn.Conv1d(channels, spec.num_classes, 1, bias=True)


class LogitReader:
    """What the `logits` [B, X, T'] of a model (fp32 or int8) mean: for CTC, class logits; for a transducer,
    projected encoder frames that its `TransducerHead` decodes."""

    def __init__(self, spec: ModelSpec, head: TransducerHead | None):
        self.spec = spec
        self.head = head
        self.text_decoder = TextDecoder.from_spec(spec)

    def outputs(self, logits: torch.Tensor) -> torch.Tensor:
        """Per-frame outputs [B, T', X]: CTC log-probabilities, or the transducer's projected frames."""
        if self.head is None:
            return torch.log_softmax(logits.transpose(1, 2), dim=-1)
        return logits.transpose(1, 2)

    def class_logits(self, logits: torch.Tensor) -> torch.Tensor:
        """[B, C, T'] class logits per frame, to compare int8 with fp32 (transducers: `start_logits`)."""
        return logits if self.head is None else self.head.start_logits(logits)

    def texts(self, outputs: torch.Tensor, lengths: torch.Tensor) -> list[str]:
        """Greedy transcripts of per-frame `outputs` [B, T', X]."""
        if self.head is None:
            return greedy_decode(outputs, lengths, self.text_decoder)
        return [self.text_decoder(ids) for ids in self.head.greedy(outputs, lengths).tokens]


class ReadsLogits(nn.Module):
    """audio -> `features` -> `logits` -> per-frame outputs that `reader` turns into text: the forward path
    the lean model and the int8 model share (each defines `features`, `reader` and `logits`)."""

    @property
    def text_decoder(self) -> TextDecoder:
        """Token ids -> text, built once per model."""
        return self.reader.text_decoder

    def forward(self, audio: torch.Tensor, lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """audio [B, T] and sample counts [B] -> per-frame outputs [B, T', X] (`LogitReader.outputs`), frame counts."""
        feats, frames = self.features(audio, lengths)
        return self.forward_features(feats, frames)

    def forward_features(self, feats: torch.Tensor, frames: torch.Tensor):
        logits, lens = self.logits(feats, frames)
        return self.reader.outputs(logits), lens


class LeanModel(ReadsLogits):
    """audio -> log-mel -> encoder -> CTC log-probabilities, or a transducer's projected encoder frames
    (`forward_features`), which `reader` turns into text."""

    def __init__(self, spec: ModelSpec):
        super().__init__()
        self.spec = spec
        self.features = MelFeatures(spec.features)
        self.encoder = make_encoder(spec)
        self.decoder = make_decoder(spec, self.encoder.out_channels)
        self.head = TransducerHead(spec) if spec.transducer is not None else None
        self.reader = LogitReader(spec, self.head)

    def logits(self, feats: torch.Tensor, frames: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Decoder output [B, X, T'] (CTC: before log-softmax), and output lengths."""
        enc, lens = self.encoder(feats, frames)
        return self.decoder(enc), lens


def save_checkpoint(spec: ModelSpec, state_dict: dict, path: str | os.PathLike | io.BytesIO) -> None:
    """Write spec + fp32 weights in a file that `load_model` reads without NeMo."""
    torch.save({"format": CHECKPOINT_FORMAT, "spec": spec.to_dict(), "state_dict": state_dict}, path)


def load_checkpoint(path) -> tuple[ModelSpec, dict]:
    data = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(data, dict) or data.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(f"{path}: not an asr-runner lean checkpoint ({CHECKPOINT_FORMAT})")
    return ModelSpec.from_dict(data["spec"]), data["state_dict"]


def build_model(spec: ModelSpec, state_dict: dict | None = None) -> LeanModel:
    """The lean model in eval mode, with `state_dict` loaded strictly when given.

    With weights, the modules are built on the meta device and take the given tensors as they
    are (`assign=True`): no second copy of the weights, ~75 MB less RSS for QuartzNet15x5.
    """
    if state_dict is None:
        return LeanModel(spec).eval()
    with torch.device("meta"):
        model = LeanModel(spec)
    model.load_state_dict(state_dict, strict=True, assign=True)
    return model.eval().requires_grad_(False)


def load_model(path) -> LeanModel:
    """Lean fp32 model from a checkpoint written by `save_checkpoint`."""
    spec, state_dict = load_checkpoint(path)
    return build_model(spec, state_dict)
