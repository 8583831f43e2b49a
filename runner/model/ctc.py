"""The lean CTC model: NeMo's CTC models (conv family and Conformers) rebuilt from plain torch modules.

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
from runner.model.decoding import TextDecoder
from runner.model.features import MelFeatures

CHECKPOINT_FORMAT = "asr-runner/lean-ctc/1"


def make_encoder(spec: ModelSpec) -> nn.Module:
    """The encoder for the spec's family: ConvEncoder (QuartzNet/Jasper) or the lean Conformer."""
    if spec.family == "conformer-ctc":
        from runner.model.conformer import ConformerEncoder

        return ConformerEncoder(spec.encoder)
    return ConvEncoder(spec)


class LeanCTCModel(nn.Module):
    """audio -> log-mel -> conv encoder -> 1x1 conv decoder -> CTC log-probabilities."""

    def __init__(self, spec: ModelSpec):
        super().__init__()
        self.spec = spec
        self.features = MelFeatures(spec.features)
        self.encoder = make_encoder(spec)
        self.decoder = nn.Conv1d(self.encoder.out_channels, spec.num_classes, 1, bias=True)
        self.text_decoder = TextDecoder.from_spec(spec)  # token ids -> text, built once per model

    def forward(self, audio: torch.Tensor, lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """audio [B, T] and sample counts [B] -> log-probs [B, T', C] and frame counts [B]."""
        feats, frames = self.features(audio, lengths)
        return self.forward_features(feats, frames)

    def forward_features(self, feats: torch.Tensor, frames: torch.Tensor):
        enc, lens = self.encoder(feats, frames)
        return self.log_probs(enc), lens

    def logits(self, feats: torch.Tensor, frames: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Decoder output [B, C, T'] before log-softmax, and output lengths."""
        enc, lens = self.encoder(feats, frames)
        return self.decoder(enc), lens

    def log_probs(self, encoded: torch.Tensor) -> torch.Tensor:
        return torch.log_softmax(self.decoder(encoded).transpose(1, 2), dim=-1)


def save_checkpoint(spec: ModelSpec, state_dict: dict, path: str | os.PathLike | io.BytesIO) -> None:
    """Write spec + fp32 weights in a file that `load_model` reads without NeMo."""
    torch.save({"format": CHECKPOINT_FORMAT, "spec": spec.to_dict(), "state_dict": state_dict}, path)


def load_checkpoint(path) -> tuple[ModelSpec, dict]:
    data = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(data, dict) or data.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(f"{path}: not an asr-runner lean checkpoint ({CHECKPOINT_FORMAT})")
    return ModelSpec.from_dict(data["spec"]), data["state_dict"]


def build_model(spec: ModelSpec, state_dict: dict | None = None) -> LeanCTCModel:
    """The lean model in eval mode, with `state_dict` loaded strictly when given.

    With weights, the modules are built on the meta device and take the given tensors as they
    are (`assign=True`): no second copy of the weights, ~75 MB less RSS for QuartzNet15x5.
    """
    if state_dict is None:
        return LeanCTCModel(spec).eval()
    with torch.device("meta"):
        model = LeanCTCModel(spec)
    model.load_state_dict(state_dict, strict=True, assign=True)
    return model.eval().requires_grad_(False)


def load_model(path) -> LeanCTCModel:
    """Lean fp32 model from a checkpoint written by `save_checkpoint`."""
    spec, state_dict = load_checkpoint(path)
    return build_model(spec, state_dict)
