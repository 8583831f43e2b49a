"""int8 post-training static quantization of the lean model (eager mode).

Every `torch.ao.quantization` call lives here, so a later move to torchao's pt2e flow touches
one module. The mel front end stays fp32 (it is ~1% of the time); the encoder and decoder run
int8 between a QuantStub (on the features) and a DeQuantStub (before log-softmax).
Recipe: fuse Conv+BN(+ReLU) -> residual adds as FloatFunctional (add+ReLU fused) -> observers
(per-channel weights) -> calibrate on real audio -> convert.
"""

from __future__ import annotations

import copy
import logging
import warnings
from contextlib import contextmanager
from typing import Iterable, Sequence

import numpy as np
import torch
from torch import nn

from .model import ConvBlock, LeanCTCModel, MaskedConv
from .transcribe import pad_batch

log = logging.getLogger(__name__)

ENGINES = ("onednn", "x86", "fbgemm", "qnnpack")


@contextmanager
def _quiet():
    """torch.ao.quantization warns that it is deprecated (in favour of torchao); keep it out of user output."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


@contextmanager
def engine_scope(engine: str):
    """Use a quantized engine for a block of work, restoring the previous one after."""
    previous = torch.backends.quantized.engine
    torch.backends.quantized.engine = engine
    try:
        yield
    finally:
        torch.backends.quantized.engine = previous


class QuantizedEncoder(nn.Module):
    """QuantStub -> lean encoder -> decoder conv -> DeQuantStub: the part of the model that runs int8."""

    def __init__(self, model: LeanCTCModel):
        super().__init__()
        from torch.ao.quantization import DeQuantStub, QuantStub

        self.quant = QuantStub()
        self.encoder = copy.deepcopy(model.encoder)
        self.decoder = copy.deepcopy(model.decoder)
        self.dequant = DeQuantStub()

    def forward(self, feats: torch.Tensor, lens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        enc, lens = self.encoder(self.quant(feats), lens)
        return self.dequant(self.decoder(enc)), lens


def fusion_groups(encoder: nn.Module, prefix: str = "encoder") -> list[list[str]]:
    """Names of [conv, bn] / [conv, bn, relu] runs in each block (NeMo's mconv/res layout)."""
    groups = []
    for b, block in enumerate(encoder.blocks):
        groups += _runs(block.mconv, f"{prefix}.blocks.{b}.mconv")
        for r, branch in enumerate(block.res or []):
            groups += _runs(branch, f"{prefix}.blocks.{b}.res.{r}")
    return groups


def _runs(layers: Sequence[nn.Module], name: str) -> list[list[str]]:
    out = []
    for i, layer in enumerate(layers):
        if isinstance(layer, nn.BatchNorm1d) and i > 0 and isinstance(layers[i - 1], MaskedConv):
            group = [f"{name}.{i - 1}.conv", f"{name}.{i}"]
            if i + 1 < len(layers) and isinstance(layers[i + 1], nn.ReLU):
                group.append(f"{name}.{i + 1}")
            out.append(group)
    return out


def prepare(model: LeanCTCModel, engine: str) -> QuantizedEncoder:
    """Fused, observed copy of the encoder+decoder, ready for calibration."""
    from torch.ao.quantization import fuse_modules, get_default_qconfig, prepare as ao_prepare
    from torch.ao.nn.quantized import FloatFunctional

    qmodel = QuantizedEncoder(model).eval()
    with _quiet(), engine_scope(engine):
        fuse_modules(qmodel, fusion_groups(qmodel.encoder), inplace=True)
        for block in qmodel.encoder.blocks:
            _quantizable_residual(block, FloatFunctional)
        qmodel.qconfig = get_default_qconfig(engine)
        ao_prepare(qmodel, inplace=True)
    return qmodel


def _quantizable_residual(block: ConvBlock, float_functional) -> None:
    if block.res is None:
        return
    block.skip = float_functional()
    if isinstance(block.mout[0], nn.ReLU):  # add + ReLU as one quantized op
        block.skip_relu = True
        block.mout[0] = nn.Identity()


@torch.inference_mode()
def calibrate(model: LeanCTCModel, qmodel: QuantizedEncoder, audios: Iterable[np.ndarray], batch_size: int = 8) -> None:
    """Run real audio through the observed model so observers see the activation ranges."""
    audios = sorted(audios, key=len)
    for start in range(0, len(audios), batch_size):
        feats, frames = model.features(*pad_batch(audios[start: start + batch_size]))
        qmodel(feats, frames)


def convert(qmodel: QuantizedEncoder, engine: str) -> QuantizedEncoder:
    """Observed -> int8 modules, packed for `engine`."""
    from torch.ao.quantization import convert as ao_convert

    with _quiet(), engine_scope(engine):
        return ao_convert(qmodel.eval(), inplace=False)


class Int8CTCModel(nn.Module):
    """fp32 features + int8 encoder/decoder, with the lean model's interface (`spec`, forward)."""

    def __init__(self, model: LeanCTCModel, qencoder: QuantizedEncoder, engine: str):
        super().__init__()
        self.spec = model.spec
        self.features = model.features
        self.qencoder = qencoder
        self.engine = engine

    def forward(self, audio: torch.Tensor, lengths: torch.Tensor):
        feats, frames = self.features(audio, lengths)
        return self.forward_features(feats, frames)

    def forward_features(self, feats: torch.Tensor, frames: torch.Tensor):
        with engine_scope(self.engine):
            logits, lens = self.qencoder(feats, frames)
        return torch.log_softmax(logits.transpose(1, 2), dim=-1), lens


def quantize(model: LeanCTCModel, calibration: Sequence[np.ndarray], engine: str = "onednn") -> Int8CTCModel:
    """Static int8 model of `model`, calibrated on `calibration` audio (mono float32 at the model rate)."""
    if engine not in ENGINES:
        raise ValueError(f"engine must be one of {', '.join(ENGINES)}, got {engine!r}")
    if engine not in torch.backends.quantized.supported_engines:
        raise ValueError(f"engine {engine!r} is not available in this torch build "
                         f"(available: {', '.join(torch.backends.quantized.supported_engines)})")
    qmodel = prepare(model, engine)
    calibrate(model, qmodel, calibration)
    return Int8CTCModel(model, convert(qmodel, engine), engine).eval()
