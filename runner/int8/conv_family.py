"""int8 for the convolutional family (QuartzNet, Jasper, Citrinet): the module structure.

Recipe: fuse Conv+BN(+ReLU) -> residual adds as FloatFunctional (add+ReLU fused) -> squeeze-excite
(Citrinet) in fp32 with its product requantized -> observers (`runner.int8.observers.qconfig`) ->
calibrate on real audio -> convert. The encoder blocks and the decoder run int8 between a
QuantStub (on the features) and a DeQuantStub (before log-softmax).

"Units" are the pieces the accuracy gate may keep in fp32: each encoder block and the decoder.
A unit kept in fp32 is the original float module between a dequantize and a requantize with the
int8 model's own scale at that border (recorded as `in_scale`/`in_zero_point`), so keeping a
unit in fp32 needs no second calibration. `int8_structure` rebuilds the converted modules for
any engine without fp32 weights. Called only through `runner.int8.model` (which sets the engine).
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterable, Sequence

import torch
from torch import nn

from runner.int8 import depthwise, direct
from runner.int8.observers import qconfig, quiet
from runner.model.arch import ModelSpec
from runner.model.conv import ConvBlock, MaskedConv, SqueezeExcite
from runner.model.ctc import LeanModel


class QuantizedEncoder(nn.Module):
    """QuantStub -> encoder blocks -> decoder conv -> DeQuantStub; some units may stay fp32."""

    def __init__(self, model: LeanModel):
        super().__init__()
        self.spec = model.spec
        from torch.ao.quantization import DeQuantStub, QuantStub

        self.quant = QuantStub()
        self.encoder = copy.deepcopy(model.encoder)
        self.decoder = copy.deepcopy(model.decoder)
        self.dequant = DeQuantStub()
        units = len(self.encoder.blocks) + 1
        # Input scale / zero point of each unit in the int8 model: where an fp32 unit hands back to int8.
        self.register_buffer("in_scale", torch.ones(units, dtype=torch.float64))
        self.register_buffer("in_zero_point", torch.zeros(units, dtype=torch.int64))
        self.float_units: frozenset[int] = frozenset()
        self.direct = False  # run `runner.int8.direct`'s forward where it covers this encoder (set by load_int8)

    def unit_names(self) -> list[str]:
        return [f"encoder.blocks.{i}" for i in range(len(self.encoder.blocks))] + ["decoder"]

    def units(self) -> list[nn.Module]:
        return list(self.encoder.blocks) + [self.decoder]

    def forward(self, feats: torch.Tensor, lens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if not self.float_units:
            plan = direct.plan_for(self) if self.direct else None
            if plan is not None:
                return plan(feats, lens)
            enc, lens = self.encoder(self.quant(feats), lens)
            return self.dequant(self.decoder(enc)), lens
        x, quantized = feats, False
        for k, unit in enumerate(self.units()):
            if k in self.float_units:
                if quantized:
                    x, quantized = x.dequantize(), False
            elif not quantized:
                x = (
                    self.quant(x)
                    if k == 0
                    else torch.quantize_per_tensor(x, float(self.in_scale[k]), int(self.in_zero_point[k]), torch.quint8)
                )
                quantized = True
            if isinstance(unit, ConvBlock):
                xs, lens = unit([x], lens)
                x = xs[-1]
            else:
                x = unit(x)
        return (x.dequantize() if quantized else x), lens


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


def prepare(model: LeanModel, observer: str = "histogram") -> QuantizedEncoder:
    """Fused, observed copy of the encoder+decoder, ready for calibration."""
    from torch.ao.nn.quantized import FloatFunctional
    from torch.ao.quantization import QuantStub, fuse_modules
    from torch.ao.quantization import prepare as ao_prepare

    qmodel = QuantizedEncoder(model).eval()
    with quiet():
        fuse_modules(qmodel, fusion_groups(qmodel.encoder), inplace=True)
        for block in qmodel.encoder.blocks:
            _quantizable_residual(block, FloatFunctional)
            _quantizable_se(block, QuantStub)
        qmodel.qconfig = qconfig(observer)
        ao_prepare(qmodel, inplace=True)
    return qmodel


def _quantizable_residual(block: ConvBlock, float_functional: Callable[[], nn.Module]) -> None:
    if block.res is None:
        return
    block.skip = float_functional()
    if isinstance(block.mout[0], nn.ReLU):  # add + ReLU as one quantized op
        block.skip_relu = True
        block.mout[0] = nn.Identity()


def _quantizable_se(block: ConvBlock, quant_stub: Callable[[], nn.Module], materialize: bool = False) -> None:
    """Squeeze-excite in an int8 block runs in fp32 on the dequantized conv output (its small linear
    layers keep qconfig None); `requant`, observed like any activation, quantizes its product.

    Measured (Citrinet-256, 4 x 10 s, onednn, 1 thread, 2-core dev machine): 145-164x real time vs
    117-146x for a quantized product (gate at sigmoid's fixed 1/256 scale, FloatFunctional.mul), logit
    cosine to fp32 0.99989 for both; on [8, 256, 125] alone 0.66 ms vs quantized::mul's 1.46 ms. Keeping
    the SE output channels-last (SqueezeExcite.forward) then cut the residual add+ReLU from 34% of int8
    time to 4%: 211-260x (lean fp32 31-45x)."""
    for layer in block.mconv:
        if isinstance(layer, SqueezeExcite):
            layer.fc.qconfig = None
            layer.requant = quant_stub()
            if materialize:  # built on the meta device: real storage for load_state_dict to fill
                layer.fc.to_empty(device="cpu")


def convert(qmodel: QuantizedEncoder) -> QuantizedEncoder:
    """Observed -> int8 modules packed for the current engine, with each unit's input scale recorded."""
    from torch.ao.quantization import convert as ao_convert

    # convert swaps modules inside their parents: a copy of the containers is enough, the leaves (the fused
    # fp32 convs and their observers, read by `from_float`) are shared with the observed model, which is
    # converted once per candidate observer. A deepcopy of QuartzNet15x5's took ~1.1 s each.
    converted = ao_convert(tree_copy(qmodel.eval()), inplace=True, remove_qconfig=False)
    _record_unit_inputs(converted, qmodel)
    return converted


def tree_copy(module: nn.Module) -> nn.Module:
    """`module` with every module that has children copied (shallow: its own dicts of children, parameters
    and buffers; buffers cloned), leaves shared."""
    if not module._modules:
        return module
    new = copy.copy(module)  # a new __dict__ holding the same values
    new._modules = {name: tree_copy(child) if child is not None else None for name, child in module._modules.items()}
    new._parameters = dict(module._parameters)
    new._buffers = {name: b.clone() if b is not None else None for name, b in module._buffers.items()}
    return new


@torch.inference_mode()
def _record_unit_inputs(converted: QuantizedEncoder, observed: QuantizedEncoder) -> None:
    """Each unit's input scale/zero point, read off one forward pass of the all-int8 model."""
    seen: dict[int, tuple[float, int]] = {}

    def hook(k):
        def record(_module, args):
            x = args[0][-1] if isinstance(args[0], list) else args[0]
            seen[k] = (x.q_scale(), x.q_zero_point())

        return record

    handles = [u.register_forward_pre_hook(hook(k)) for k, u in enumerate(converted.units())]
    try:
        feat_in = observed.encoder.blocks[0].mconv[0].conv.in_channels
        converted(torch.zeros(1, feat_in, 64), torch.tensor([64]))
    finally:
        for h in handles:
            h.remove()
    for k, (scale, zero_point) in seen.items():
        converted.in_scale[k] = scale
        converted.in_zero_point[k] = zero_point


def with_float_units(qenc: QuantizedEncoder, model: LeanModel, units: Iterable[int]) -> QuantizedEncoder:
    """A copy of the int8 `qenc` in which `units` run the fp32 modules of `model` (shared, not
    copied); call it under the engine's scope (copying repacks the int8 weights for it)."""
    units = frozenset(units)
    hybrid = copy.deepcopy(qenc)
    for k in units:
        if k == len(model.encoder.blocks):
            hybrid.decoder = model.decoder
        else:
            hybrid.encoder.blocks[k] = model.encoder.blocks[k]
    hybrid.float_units = units
    return hybrid


def int8_structure(spec: ModelSpec, float_units: Sequence[int] = ()) -> QuantizedEncoder:
    """The converted module structure for `spec`, built directly (no fp32 weights, no calibration).

    Call it, and load an artifact's state dict into it, under the engine's scope (that packs the
    int8 weights for the engine).
    """
    import torch.ao.nn.intrinsic.quantized as nniq
    import torch.ao.nn.quantized as nnq

    with torch.device("meta"):
        skeleton = LeanModel(spec)
    qenc = QuantizedEncoder(skeleton)
    qenc.in_scale = torch.ones(len(qenc.in_scale), dtype=torch.float64)
    qenc.in_zero_point = torch.zeros(len(qenc.in_zero_point), dtype=torch.int64)
    with quiet():
        for group in fusion_groups(qenc.encoder):
            conv = _get(qenc, group[0])
            _set(qenc, group[0], _qconv(nniq.ConvReLU1d if len(group) == 3 else nnq.Conv1d, conv, bias=True))
            for name in group[1:]:
                _set(qenc, name, nn.Identity())
        for name, module in list(qenc.named_modules()):
            if type(module) is nn.Conv1d:
                _set(qenc, name, _qconv(nnq.Conv1d, module, bias=module.bias is not None))
        for block in qenc.encoder.blocks:
            _quantizable_residual(block, nnq.QFunctional)
            _quantizable_se(block, lambda: nnq.Quantize(1.0, 0, torch.quint8), materialize=True)
        qenc.quant = nnq.Quantize(1.0, 0, torch.quint8)
        qenc.dequant = nnq.DeQuantize()
    for k in float_units:  # fp32 modules with real (empty) storage, filled by load_state_dict
        if k == len(spec.encoder.blocks):
            qenc.decoder = skeleton.decoder.to_empty(device="cpu")
        else:
            qenc.encoder.blocks[k] = skeleton.encoder.blocks[k].to_empty(device="cpu")
    qenc.float_units = frozenset(float_units)
    return qenc.eval()


def eight_bit_outputs(spec: ModelSpec, state_dict: dict, engine: str) -> set[str]:
    """Scale keys of int8 outputs that no saturating u8 x s8 product reads, so they keep 8 bits where
    others need 7: the decoder's (the logits, only dequantized), each residual branch conv's and
    squeeze-excite product's (read by the quantized add), a block's last conv when an add or the
    squeeze-excite (which dequantizes) reads it; and on onednn, whose depthwise kernels multiply in
    int32 (measured exact on full-range input, where fbgemm's are off by 23 steps), the pointwise
    convs inside a separable block, which only the next depthwise conv reads. The add's output feeds
    the next block's convs: 7 bits there."""
    keys, out = set(state_dict), {"decoder.scale"}
    for b, block in enumerate(spec.encoder.blocks):
        prefix = f"encoder.blocks.{b}."
        convs = sorted(
            int(k.split(".")[4]) for k in keys if k.startswith(prefix + "mconv.") and k.endswith(".conv.scale")
        )
        if convs and (block.residual or block.se):
            out.add(f"{prefix}mconv.{convs[-1]}.conv.scale")
        if engine == "onednn" and block.separable:  # [dw, pw] x repeat: pw i feeds dw i + 1 alone
            out |= {f"{prefix}mconv.{j}.conv.scale" for j in convs[1:-1:2]}
        if block.residual:
            out |= {k for k in keys if k.startswith(prefix + "res.") and k.endswith(".conv.scale")}
            out |= {k for k in keys if k.startswith(prefix + "mconv.") and k.endswith(".requant.scale")}
    return out & keys


def cpu_depthwise(qenc: QuantizedEncoder, engine: str) -> QuantizedEncoder:
    """`qenc` (loaded) with its depthwise convs on our AVX2 kernel where it applies on this CPU
    (`runner.int8.depthwise`); records what they run on as `qenc.depthwise_convs`. Returns `qenc`."""
    qenc.depthwise_convs = depthwise.kernel_for(engine)
    if qenc.depthwise_convs == depthwise.NAME:
        for name, module in list(qenc.named_modules()):
            if depthwise.swappable(module):
                _set(qenc, name, depthwise.DepthwiseConv1d.of(module))
    return qenc


def _qconv(cls, conv: nn.Conv1d, bias: bool):
    return cls(
        conv.in_channels,
        conv.out_channels,
        conv.kernel_size[0],
        stride=conv.stride[0],
        padding=conv.padding[0],
        dilation=conv.dilation[0],
        groups=conv.groups,
        bias=bias,
    )


def _get(root: nn.Module, name: str) -> nn.Module:
    return root.get_submodule(name)


def _set(root: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, leaf = name.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, leaf, module)
