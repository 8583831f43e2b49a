"""int8 for the Conformer family: static int8 Linear layers and subsampling convs, fp32 elsewhere.

Chosen by measurement (FastConformer-CTC large, 10 s utterances, 2 threads, onednn, quiet machine):
- The Linear layers (feed-forward, attention projections and the conv module's pointwise convs,
  which the lean model runs as Linear) are most of the time. Each sits in a `QLinear`: its own
  QuantStub (a calibrated input scale), int8 weights (per-channel symmetric), a calibrated output
  scale and a DeQuantStub, so softmax, layer norms, SiLU/GLU, the depthwise conv, BatchNorm and
  the decoder stay fp32 between them. Against dynamic int8 Linear layers (activation scales
  computed per batch at run time), whole model: 82 vs 86 ms at batch 1, 332 vs 377 ms at batch 8
  (fp32 176 / 1027 ms); logit cosine to fp32 0.99992 vs 0.99981 (random weights); on the trained
  tiny FastConformer of the tests, word agreement with fp32 98.2% vs 98.9%. Static scales also
  make an utterance's transcript independent of its batch-mates, as in fp32 (dynamic scales
  changed 3 of ~113 words between batched and alone).
- The attention matmuls (~20% of the int8 model's time at batch 8) take bf16 operands on a CPU with
  bf16 in hardware (`engines.attention_dtype`, `cpu_attention`), fp32 elsewhere.
- The subsampling convs (~20% of the int8 model's time when fp32) are static int8 as well:
  126-161 ms -> ~51 ms for the conv stack at batch 8. They run one utterance at a time at its own
  length (`Int8Subsampling`), so no padded frame reaches them and they need no masking in int8.
  Their output Linear stays fp32: in int8 it was the largest source of transcript changes on a
  trained model (int8 vs fp32 agreement 97.2% with it, 100% without, on 40 held-out utterances)
  for ~1% of the FLOPs.

"Units" the accuracy gate may keep in fp32 are the subsampling module and each Conformer layer.
The state dict is engine-neutral (int8 weights + scales; loading under an engine packs them), so
the artifact and the worker side work exactly as for the convolutional family. Called only
through `runner.int8.model`, which keeps every `torch.ao.quantization` use behind it.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterable, Sequence

import torch
from torch import nn

from runner.model.arch import ModelSpec
from runner.model.conformer import ConvSubsampling, as_image, frames_of, subsampled_length
from runner.model.ctc import LeanModel

RECIPE = {
    "weights": "qint8 per-channel symmetric (Linear layers; subsampling convs)",
    "activations": "static quint8, calibrated: the input and output of each int8 Linear and of the "
    "subsampling convs; fp32 elsewhere",
    "attention": "matmul operands in bf16 on CPUs with avx512_bf16 or amx_bf16 (scores and softmax in fp32), "
    "fp32 elsewhere",
}


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
            y = frames_of(self.dequant(self.conv(self.quant(as_image(feats[i : i + 1, :, :n])))))  # [1, t_i, C*F']
            x[i, : y.shape[1]] = y[0]
        return self.out(x), frames


def _conv_relu_pairs(seq: nn.Sequential, prefix: str = "conv") -> list[list[str]]:
    """[conv, relu] names to fuse in the subsampling Sequential."""
    layers = list(seq)
    return [
        [f"{prefix}.{i}", f"{prefix}.{i + 1}"]
        for i in range(len(layers) - 1)
        if isinstance(layers[i], nn.Conv2d) and isinstance(layers[i + 1], nn.ReLU)
    ]


class QLinear(nn.Module):
    """A Linear between its own QuantStub and DeQuantStub: static int8 with calibrated input and
    output scales (per Linear), fp32 in and out, so the fp32 ops around it stay as they are."""

    def __init__(self, linear: nn.Module):
        super().__init__()
        from torch.ao.quantization import DeQuantStub, QuantStub

        self.quant, self.linear, self.dequant = QuantStub(), linear, DeQuantStub()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dequant(self.linear(self.quant(x)))


def _wrap_linears(layer: nn.Module, make: Callable[[nn.Linear], nn.Module]) -> list[nn.Module]:
    """Replace every nn.Linear of `layer` by `make(linear)`; returns the new modules."""
    made = []
    for name, module in list(layer.named_modules()):
        if type(module) is nn.Linear:
            parent, _, leaf = name.rpartition(".")
            made.append(make(module))
            setattr(layer.get_submodule(parent) if parent else layer, leaf, made[-1])
    return made


class QuantizedConformer(nn.Module):
    """Encoder + decoder of a lean Conformer with int8 subsampling convs and Linear layers; some units may stay fp32."""

    recipe = RECIPE

    def __init__(self, model: LeanModel):
        super().__init__()
        self.spec = model.spec
        self.encoder = copy.deepcopy(model.encoder)
        self.decoder = copy.deepcopy(model.decoder)
        if model.head is not None:  # a transducer's prediction + joint networks: fp32, carried in the state dict
            self.head = copy.deepcopy(model.head)
        self.float_units: frozenset[int] = frozenset()
        self.attention_dtype = torch.float32  # of the int8 layers' attention matmuls (`cpu_attention`)

    def unit_names(self) -> list[str]:
        return ["encoder.pre_encode"] + [f"encoder.layers.{i}" for i in range(len(self.encoder.layers))]

    def units(self) -> list[nn.Module]:
        return [self.encoder.pre_encode] + list(self.encoder.layers)

    def forward(self, feats: torch.Tensor, lens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        enc, lens = self.encoder(feats, lens)
        return self.decoder(enc), lens


def prepare(model: LeanModel, observer: str = "histogram") -> QuantizedConformer:
    """A copy whose subsampling convs (fused with their ReLU) and Linear layers (each in a `QLinear`)
    are observed, `observer` for activations."""
    from torch.ao.quantization import fuse_modules
    from torch.ao.quantization import prepare as ao_prepare

    from runner.int8.observers import qconfig, quiet

    qmodel = QuantizedConformer(model).eval()
    sub = Int8Subsampling(qmodel.encoder.pre_encode).eval()
    with quiet():
        fuse_modules(sub, _conv_relu_pairs(sub.conv), inplace=True)
        sub.qconfig = qconfig(observer)
        sub.out.qconfig = None
        ao_prepare(sub, inplace=True)
    qmodel.encoder.pre_encode = sub
    with quiet():
        for layer in qmodel.encoder.layers:
            for wrapper in _wrap_linears(layer, QLinear):
                wrapper.qconfig = qconfig(observer)  # only the wrappers: norms, convs, SiLU stay fp32
            ao_prepare(layer, inplace=True)
    return qmodel


def convert(qmodel: QuantizedConformer) -> QuantizedConformer:
    """Observed -> int8 subsampling convs and Linear layers (packed for the current engine)."""
    from torch.ao.quantization import convert as ao_convert

    converted = copy.deepcopy(qmodel)
    for unit in converted.units():
        ao_convert(unit, inplace=True)
    return cpu_attention(converted)


def cpu_attention(qenc: QuantizedConformer) -> QuantizedConformer:
    """`qenc` with each int8 layer's attention matmuls in this CPU's `attention_dtype` (bf16 where it has
    bf16 in hardware); layers kept in fp32 stay fp32 throughout. Returns `qenc`."""
    from runner.int8.engines import attention_dtype

    dtype = attention_dtype()
    for k, layer in enumerate(qenc.encoder.layers, start=1):
        if k not in qenc.float_units:
            layer.self_attn.matmul_dtype = dtype
    qenc.attention_dtype = dtype
    return qenc


def with_float_units(qenc: QuantizedConformer, model: LeanModel, units: Iterable[int]) -> QuantizedConformer:
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


def _int8_qlinear(linear: nn.Linear) -> QLinear:
    import torch.ao.nn.quantized as nnq

    wrapper = QLinear(
        nnq.Linear(linear.in_features, linear.out_features, bias_=linear.bias is not None, dtype=torch.qint8)
    )
    wrapper.quant, wrapper.dequant = nnq.Quantize(1.0, 0, torch.quint8), nnq.DeQuantize()
    return wrapper


def eight_bit_outputs(spec: ModelSpec, state_dict: dict, engine: str) -> set[str]:
    """Scale keys of int8 outputs that no u8 x s8 product reads (only a dequantize), so they keep 8 bits
    where others need 7: each `QLinear`'s Linear output and the last subsampling conv's."""
    keys = set(state_dict)
    linears = {k for k in keys if k.endswith(".linear.scale") and k[: -len("linear.scale")] + "quant.scale" in keys}
    convs = [k for k in keys if k.startswith("encoder.pre_encode.conv.") and k.endswith(".scale")]
    last = max(convs, key=lambda k: int(k.split(".")[3]), default=None)
    return linears | ({last} if last else set())


def int8_structure(spec: ModelSpec, float_units: Sequence[int] = ()) -> QuantizedConformer:
    """The converted module structure, built without fp32 weights: load an artifact's state dict into
    it (under the engine's scope, which packs the int8 weights for it)."""
    import torch.ao.nn.intrinsic.quantized as nniq
    import torch.ao.nn.quantized as nnq

    with torch.device("meta"):
        skeleton = LeanModel(spec)
    qenc = QuantizedConformer(skeleton)
    if 0 not in float_units:
        sub = Int8Subsampling(qenc.encoder.pre_encode)
        fused = {group[0] for group in _conv_relu_pairs(sub.conv)}
        for i, layer in enumerate(list(sub.conv)):
            if isinstance(layer, nn.Conv2d):
                cls = nniq.ConvReLU2d if f"conv.{i}" in fused else nnq.Conv2d
                sub.conv[i] = cls(
                    layer.in_channels,
                    layer.out_channels,
                    layer.kernel_size,
                    stride=layer.stride,
                    padding=layer.padding,
                    groups=layer.groups,
                    bias=layer.bias is not None,
                )
            elif isinstance(layer, nn.ReLU):
                sub.conv[i] = nn.Identity()
        sub.quant = nnq.Quantize(1.0, 0, torch.quint8)
        sub.dequant = nnq.DeQuantize()
        qenc.encoder.pre_encode = sub
    for k, layer in enumerate(qenc.encoder.layers):
        if k + 1 in float_units:
            continue
        _wrap_linears(layer, _int8_qlinear)
    qenc.to_empty(device="cpu")  # the fp32 parts: real (empty) storage, filled by load_state_dict
    qenc.float_units = frozenset(float_units)
    return cpu_attention(qenc).eval()
