"""int8 for the Conformer family: static int8 subsampling convs, dynamic int8 Linear layers, fp32 elsewhere.

Chosen by measurement (FastConformer-CTC large, batch 8 x 10 s, 2 threads, onednn):
- The Linear layers (feed-forward, attention projections and the conv module's pointwise convs,
  which the lean model runs as Linear) are most of the time. They get int8 weights (per-channel
  symmetric) and activations quantized per batch at run time (dynamic int8); softmax, layer
  norms, the depthwise conv, BatchNorm and the decoder stay fp32. Static int8 Linear layers
  (calibrated scales, a quantize before and a dequantize after each, around the fp32 SiLU) were
  measured afterwards on the feed-forward block alone, [B, 126, 512] -> 2048 -> 512, onednn, 2
  threads: 0.95 vs 1.23 ms at batch 1, 15.0 vs 16.2 ms at batch 8, so they are the next lever;
  their accuracy on a trained model is not measured yet.
- The subsampling convs (~20% of the int8 model's time when fp32) are static int8 with
  calibrated activation scales, as in the convolutional family: 126-161 ms -> ~51 ms for the
  conv stack. They run one utterance at a time at its own length (`Int8Subsampling`), so no
  padded frame reaches them and they need no masking in int8. Their output Linear stays fp32:
  in int8 it was the largest source of transcript changes on a trained model (int8 vs fp32
  agreement 97.2% with it, 100% without, on 40 held-out utterances) for ~1% of the FLOPs.

"Units" the accuracy gate may keep in fp32 are the subsampling module and each Conformer layer.
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
from .conformer import ConvSubsampling, subsampled_length
from .model import LeanCTCModel

RECIPE = {"weights": "qint8 per-channel symmetric (Linear layers; subsampling convs)",
          "activations": "Linear: dynamic, quantized per batch inside each int8 Linear; subsampling convs: "
                         "static quint8, calibrated; fp32 elsewhere"}


class Int8Subsampling(nn.Module):
    """The subsampling convs in static int8 (QuantStub -> convs -> DeQuantStub), output Linear in fp32.

    Runs one utterance at a time at its own length: the convs' own zero padding then stands in
    for NeMo's masking of padded frames (frame for frame the same input), which quantized
    tensors could not take without a dequantize/quantize round trip of the largest activation
    in the model. Frames past an utterance's length are zero before the output Linear.
    """

    def __init__(self, pre: ConvSubsampling):
        super().__init__()
        from torch.ao.quantization import DeQuantStub, QuantStub

        self.quant = QuantStub()
        self.conv = copy.deepcopy(pre.conv)
        self.dequant = DeQuantStub()
        self.out = copy.deepcopy(pre.out)
        self.steps = pre.steps

    def forward(self, feats: torch.Tensor, lens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """feats [B, F, T] -> [B, T', d_model] and lengths T' (as ConvSubsampling)."""
        frames = subsampled_length(lens, self.steps)
        t_out = int(subsampled_length(torch.tensor([feats.shape[2]]), self.steps)[0])
        x = feats.new_zeros(feats.shape[0], t_out, self.out.in_features)
        for i, n in enumerate(lens.tolist()):
            if n <= 0:
                continue
            one = feats[i: i + 1, :, :n].transpose(1, 2).unsqueeze(1).contiguous(memory_format=torch.channels_last)
            y = self.dequant(self.conv(self.quant(one)))  # [1, C, t_i, F']
            x[i, : y.shape[2]] = y[0].transpose(0, 1).reshape(y.shape[2], -1)
        return self.out(x), frames


def _conv_relu_pairs(seq: nn.Sequential, prefix: str = "conv") -> list[list[str]]:
    """[conv, relu] names to fuse in the subsampling Sequential."""
    layers = list(seq)
    return [[f"{prefix}.{i}", f"{prefix}.{i + 1}"] for i in range(len(layers) - 1)
            if isinstance(layers[i], nn.Conv2d) and isinstance(layers[i + 1], nn.ReLU)]


class QuantizedConformer(nn.Module):
    """Encoder + decoder of a lean Conformer with int8 subsampling and Linear layers; some units may stay fp32."""

    recipe = RECIPE

    def __init__(self, model: LeanCTCModel):
        super().__init__()
        self.spec = model.spec
        self.encoder = copy.deepcopy(model.encoder)
        self.decoder = copy.deepcopy(model.decoder)
        self.float_units: frozenset[int] = frozenset()

    def unit_names(self) -> list[str]:
        return ["encoder.pre_encode"] + [f"encoder.layers.{i}" for i in range(len(self.encoder.layers))]

    def units(self) -> list[nn.Module]:
        return [self.encoder.pre_encode] + list(self.encoder.layers)

    def forward(self, feats: torch.Tensor, lens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        enc, lens = self.encoder(feats, lens)
        return self.decoder(enc), lens


def prepare(model: LeanCTCModel, observer: str = "histogram") -> QuantizedConformer:
    """A copy whose subsampling convs are fused and observed (`observer` for activations); Linear
    layers need no observers (dynamic int8)."""
    from torch.ao.quantization import fuse_modules, prepare as ao_prepare

    from .quantize import qconfig, quiet

    qmodel = QuantizedConformer(model).eval()
    sub = Int8Subsampling(qmodel.encoder.pre_encode).eval()
    with quiet():
        fuse_modules(sub, _conv_relu_pairs(sub.conv), inplace=True)
        sub.qconfig = qconfig(observer)
        sub.out.qconfig = None
        ao_prepare(sub, inplace=True)
    qmodel.encoder.pre_encode = sub
    return qmodel


def convert(qmodel: QuantizedConformer) -> QuantizedConformer:
    """Observed subsampling -> int8 convs; every Linear of every layer not kept in fp32 -> dynamic
    int8 (packed for the current engine)."""
    from torch.ao.quantization import convert as ao_convert, per_channel_dynamic_qconfig, quantize_dynamic

    converted = copy.deepcopy(qmodel)
    if 0 not in converted.float_units:
        converted.encoder.pre_encode = ao_convert(converted.encoder.pre_encode, inplace=False)
    for k, layer in enumerate(converted.encoder.layers):
        if k + 1 not in converted.float_units:
            converted.encoder.layers[k] = quantize_dynamic(layer, {nn.Linear: per_channel_dynamic_qconfig}, inplace=True)
    return converted


def with_float_units(qenc: QuantizedConformer, model: LeanCTCModel, units: Iterable[int]) -> QuantizedConformer:
    """A copy of `qenc` in which `units` run the fp32 modules of `model` (shared, not copied)."""
    units = frozenset(units)
    hybrid = copy.deepcopy(qenc)
    for k in units:
        if k == 0:
            hybrid.encoder.pre_encode = model.encoder.pre_encode
        else:
            hybrid.encoder.layers[k - 1] = model.encoder.layers[k - 1]
    hybrid.float_units = units
    return hybrid


def int8_structure(spec: ModelSpec, float_units: Sequence[int] = ()) -> QuantizedConformer:
    """The converted module structure, built without fp32 weights: load an artifact's state dict into
    it (under the engine's scope, which packs the int8 weights for it)."""
    import torch.ao.nn.intrinsic.quantized as nniq
    import torch.ao.nn.quantized as nnq
    import torch.ao.nn.quantized.dynamic as nnqd

    with torch.device("meta"):
        skeleton = LeanCTCModel(spec)
    qenc = QuantizedConformer(skeleton)
    if 0 not in float_units:
        sub = Int8Subsampling(qenc.encoder.pre_encode)
        fused = {group[0] for group in _conv_relu_pairs(sub.conv)}
        for i, layer in enumerate(list(sub.conv)):
            if isinstance(layer, nn.Conv2d):
                cls = nniq.ConvReLU2d if f"conv.{i}" in fused else nnq.Conv2d
                sub.conv[i] = cls(layer.in_channels, layer.out_channels, layer.kernel_size, stride=layer.stride,
                                  padding=layer.padding, groups=layer.groups, bias=layer.bias is not None)
            elif isinstance(layer, nn.ReLU):
                sub.conv[i] = nn.Identity()
        sub.quant = nnq.Quantize(1.0, 0, torch.quint8)
        sub.dequant = nnq.DeQuantize()
        qenc.encoder.pre_encode = sub
    for k, layer in enumerate(qenc.encoder.layers):
        if k + 1 in float_units:
            continue
        for name, module in list(layer.named_modules()):
            if type(module) is nn.Linear:
                parent, _, leaf = name.rpartition(".")
                int8 = nnqd.Linear(module.in_features, module.out_features, bias_=module.bias is not None,
                                   dtype=torch.qint8)
                setattr(layer.get_submodule(parent) if parent else layer, leaf, int8)
    qenc.to_empty(device="cpu")  # the fp32 parts: real (empty) storage, filled by load_state_dict
    qenc.float_units = frozenset(float_units)
    return qenc.eval()
