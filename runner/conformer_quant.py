"""int8 for the Conformer family: dynamic int8 Linear layers, everything else fp32 (chosen by measurement).

A Conformer spends most of its time in Linear layers (feed-forward, attention projections and the
conv module's pointwise convs, which the lean model runs as Linear). Those get int8 weights
(per-channel symmetric) and activations quantized per batch at run time (dynamic int8), so no
activation observers or calibration pass are needed: softmax, layer norms, the depthwise conv,
BatchNorm and the decoder stay fp32 (timings in benchmarks/fastconformer.py and the README).
The subsampling module stays fp32 too: its output Linear is ~1% of the FLOPs but, in int8, was
the largest source of transcript changes on a trained model (int8 vs fp32 agreement 97.2%
with it, 100% without, on 40 held-out utterances).

"Units" the accuracy gate may keep in fp32 are the Conformer layers.
The state dict is engine-neutral (int8 weights + scales; loading under an engine packs them), so
the artifact and the worker side work exactly as for the convolutional family. Called only
through `runner.quantize`, which keeps every `torch.ao.quantization` use behind it.
"""

from __future__ import annotations

import copy
from typing import Iterable, Sequence

import torch
from torch import nn

from .arch import ModelSpec
from .model import LeanCTCModel

RECIPE = {"weights": "qint8 per-channel symmetric (Linear layers)",
          "activations": "dynamic: quantized per batch inside each int8 Linear; fp32 elsewhere"}


class QuantizedConformer(nn.Module):
    """Encoder + decoder of a lean Conformer with int8 Linear layers; some units may stay fp32."""

    observes_activations = False  # dynamic int8: runner.quantize.calibrate has nothing to observe
    recipe = RECIPE

    def __init__(self, model: LeanCTCModel):
        super().__init__()
        self.encoder = copy.deepcopy(model.encoder)
        self.decoder = copy.deepcopy(model.decoder)
        self.float_units: frozenset[int] = frozenset()

    def unit_names(self) -> list[str]:
        return [f"encoder.layers.{i}" for i in range(len(self.encoder.layers))]

    def units(self) -> list[nn.Module]:
        return list(self.encoder.layers)

    def forward(self, feats: torch.Tensor, lens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        enc, lens = self.encoder(feats, lens)
        return self.decoder(enc), lens


def prepare(model: LeanCTCModel) -> QuantizedConformer:
    """A copy to convert; dynamic int8 needs no observers."""
    return QuantizedConformer(model).eval()


def convert(qmodel: QuantizedConformer) -> QuantizedConformer:
    """Every Linear of every unit not kept in fp32 -> dynamic int8 (packed for the current engine)."""
    from torch.ao.quantization import per_channel_dynamic_qconfig, quantize_dynamic

    converted = copy.deepcopy(qmodel)
    for k, unit in enumerate(converted.units()):
        if k not in converted.float_units:
            converted.encoder.layers[k] = quantize_dynamic(unit, {nn.Linear: per_channel_dynamic_qconfig}, inplace=True)
    return converted


def with_float_units(qenc: QuantizedConformer, model: LeanCTCModel, units: Iterable[int]) -> QuantizedConformer:
    """A copy of `qenc` in which `units` run the fp32 modules of `model` (shared, not copied)."""
    units = frozenset(units)
    hybrid = copy.deepcopy(qenc)
    for k in units:
        hybrid.encoder.layers[k] = model.encoder.layers[k]
    hybrid.float_units = units
    return hybrid


def int8_structure(spec: ModelSpec, float_units: Sequence[int] = ()) -> QuantizedConformer:
    """The converted module structure, built without fp32 weights: load an artifact's state dict into it."""
    import torch.ao.nn.quantized.dynamic as nnqd

    with torch.device("meta"):
        skeleton = LeanCTCModel(spec)
    qenc = QuantizedConformer(skeleton)
    for k, unit in enumerate(qenc.units()):
        if k in float_units:
            continue
        for name, module in list(unit.named_modules()):
            if type(module) is nn.Linear:
                parent, _, leaf = name.rpartition(".")
                int8 = nnqd.Linear(module.in_features, module.out_features, bias_=module.bias is not None,
                                   dtype=torch.qint8)
                setattr(unit.get_submodule(parent) if parent else unit, leaf, int8)
    qenc.to_empty(device="cpu")  # the fp32 parts: real (empty) storage, filled by load_state_dict
    qenc.float_units = frozenset(float_units)
    return qenc.eval()
