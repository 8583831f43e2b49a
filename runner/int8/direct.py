"""The conv family's int8 forward on plain uint8 tensors, oneDNN called directly (the onednn engine).

Why: torch's quantized conv modules cost more per call than oneDNN's kernels need. A call whose shape differs
from the module's first call (in a job: every batch) builds its oneDNN primitive descriptor again through
ideep, and the module layers, masking and quantized adds add Python and dispatch around 100-300 convs. Outside
the kernels, QuartzNet15x5 spent 16-20% of its batch-1 forward with the AVX2 kind's kernels and 41% natively
on AVX-512 VNNI, Citrinet-256 82%. This forward made batch 1 1.09x / 1.17x faster on QuartzNet15x5 and
1.18x / 1.26x on Citrinet-256, batch 8 0-4% (Zen 5 EPYC, `benchmarks/call_overhead.py`, docs/cpu-kinds.md).

How: built once per loaded int8 encoder (`plan_for`) from its own modules; nothing new is saved or loaded, and
it holds a second packed copy of the int8 weights (oneDNN's layout; the modules keep theirs for the fallback).
- Every activation is a uint8 tensor of rows [B, T, C] (contiguous: what oneDNN's channels-last convs read and
  write) with its scale and zero point beside it (`Q`).
- Each conv is `torch.ops.onednn.qconv_pointwise` (the op torch's compiled int8 graphs call; it builds the
  primitive descriptor with oneDNN's own API, for any shape) on a [B, C, 1, T] view. Its weights are packed
  once (`qconv_prepack`), on the first call's shape and input quantization.
- A residual branch's conv adds into the block's output (oneDNN's sum post-op), with the block's ReLU,
  instead of a separate quantized add.
- Masking, squeeze-excite (fp32) and lengths follow the modules (`runner.model.conv`); our AVX2 depthwise
  kernel runs where it is swapped in (`DepthwiseConv1d.rows`).

The arithmetic is the modules', but for the fused adds: one rounding instead of two and no clamp of the branch
at its own output scale, so logits can differ from the modules' by a few steps (as close to fp32's, measured);
the gate and each worker's self-check measure the model as it runs. Where: the onednn engine
on x86, a CTC conv-family encoder with no unit kept in fp32 and no dense residual; anything else (or
`ASR_RUNNER_INT8_DIRECT=0`, a diagnostic switch) runs the modules.
"""

from __future__ import annotations

import os
import platform
import weakref
from dataclasses import dataclass

import torch
import torch.ao.nn.intrinsic.quantized as nniq
import torch.ao.nn.quantized as nnq
from torch import nn

from runner.int8.depthwise import DepthwiseConv1d
from runner.model.conv import ConvBlock, MaskedConv, SqueezeExcite, zero_padding_

SWITCH = "ASR_RUNNER_INT8_DIRECT"
_PLANS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # encoder -> its plan (None: modules run)


class Unsupported(Exception):
    """A structure this forward does not cover: the modules run it."""


def applies(engine: str) -> bool:
    """Whether the conv family's int8 encoder on `engine` runs this forward on this machine."""
    if engine != "onednn" or os.environ.get(SWITCH, "1") == "0":
        return False
    if platform.machine().lower() not in ("x86_64", "amd64") or not torch.backends.mkldnn.is_available():
        return False
    try:
        torch.ops.onednn.qconv_pointwise.default  # noqa: B018 (absent in builds without oneDNN's int8 ops)
        torch.ops.onednn.qconv2d_pointwise.binary  # noqa: B018
    except (AttributeError, RuntimeError):
        return False
    return True


def plan_for(qenc: nn.Module) -> DirectForward | None:
    """The forward for `qenc` (a loaded conv-family `QuantizedEncoder`), built on first use, or None where its
    structure is not covered. Kept beside the encoder, not in it: copies of it build their own."""
    if qenc not in _PLANS:
        try:
            _PLANS[qenc] = DirectForward(qenc)
        except Unsupported:
            _PLANS[qenc] = None
    return _PLANS[qenc]


@dataclass
class Q:
    rows: torch.Tensor  # uint8 [B, T, C], contiguous
    scale: float
    zero_point: int


def quantize(x: torch.Tensor, scale: float, zero_point: int) -> Q:
    """fp32 rows [B, T, C] (contiguous) -> Q, rounded by torch's own quantize. (Its int_repr is a copy: a uint8
    view of a quantized tensor crashed when written to.)"""
    return Q(torch.quantize_per_tensor(x, scale, zero_point, torch.quint8).int_repr(), scale, zero_point)


def dequantize(x: Q) -> torch.Tensor:
    return (x.rows.float() - x.zero_point) * x.scale


def mask_(x: Q, lens: torch.Tensor) -> None:
    """Each row's frames past its length set to the zero point (0.0), in place, as the modules do it."""
    zero_padding_(x.rows.transpose(1, 2), lens, x.zero_point)


class Conv:
    """One int8 conv module as a direct call: an `nnq.Conv1d`, a fused `ConvReLU1d`, or our AVX2 depthwise."""

    def __init__(self, module: nn.Module):
        self.out = (float(module.scale), int(module.zero_point))
        self.depthwise = module if isinstance(module, DepthwiseConv1d) else None
        if self.depthwise is not None:
            return
        if type(module) not in (nnq.Conv1d, nniq.ConvReLU1d) or module.padding_mode != "zeros":
            raise Unsupported(type(module).__name__)
        w = module.weight()
        if w.qscheme() in (torch.per_channel_affine, torch.per_channel_symmetric):
            scales, zeros = w.q_per_channel_scales(), w.q_per_channel_zero_points()
        else:
            scales, zeros = torch.tensor([w.q_scale()]), torch.tensor([w.q_zero_point()])
        if bool(zeros.ne(0).any()):
            raise Unsupported("asymmetric int8 weights")
        self.module = module  # its int8 weights are packed again for oneDNN's own layout on the first call
        self.scales = scales.float()
        self.zeros = torch.zeros(len(scales), dtype=torch.long)
        bias = module.bias()
        self.bias = None if bias is None else bias.detach().float()
        self.geometry = ([1, module.stride[0]], [0, module.padding[0]], [1, module.dilation[0]], module.groups)
        self.relu = type(module) is nniq.ConvReLU1d
        self.packed, self.packed_for = None, None

    def _view(self, x: Q) -> torch.Tensor:
        """x as oneDNN reads it, [B, C, 1, T] channels last, with the weights packed for its quantization."""
        v = x.rows.permute(0, 2, 1).unsqueeze(2)
        if self.packed_for != (x.scale, x.zero_point):
            weight = self.module.weight().int_repr().unsqueeze(2)  # [O, I / groups, 1, K]
            self.packed = torch.ops.onednn.qconv_prepack(
                weight, self.scales, x.scale, x.zero_point, *self.geometry, list(v.shape)
            )
            self.packed_for = (x.scale, x.zero_point)
        return v

    def __call__(self, x: Q) -> Q:
        if self.depthwise is not None:
            return Q(self.depthwise.rows(x.rows, x.scale, x.zero_point), *self.out)
        y = torch.ops.onednn.qconv_pointwise(
            self._view(x), x.scale, x.zero_point, self.packed, self.scales, self.zeros, self.bias, *self.geometry,
            *self.out, None, "relu" if self.relu else "none", [], "",
        )  # fmt: skip
        return Q(y.squeeze(2).permute(0, 2, 1), *self.out)

    def add_into(self, x: Q, acc: Q, out: tuple[float, int], relu: bool) -> Q:
        """conv(x) + acc, quantized to `out` (scale, zero point), ReLU after if `relu`: written over acc's rows."""
        if self.depthwise is not None or self.relu:
            raise Unsupported("a residual conv with its own ReLU, or depthwise")
        torch.ops.onednn.qconv2d_pointwise.binary(
            self._view(x), x.scale, x.zero_point, self.packed, self.scales, self.zeros,
            acc.rows.permute(0, 2, 1).unsqueeze(2), self.bias, *self.geometry, *out, None, acc.scale, acc.zero_point,
            "sum", 1.0, "relu" if relu else "none", [], "",
        )  # fmt: skip
        return Q(acc.rows, *out)


class Masked:
    """A `MaskedConv`: frames past each length set to the zero point when it mixes frames, padding, the conv."""

    def __init__(self, layer: MaskedConv):
        self.layer, self.conv = layer, Conv(layer.conv)

    def input(self, x: Q, lens: torch.Tensor) -> Q:
        if self.layer.use_mask and int(lens.min()) < x.rows.shape[1]:
            mask_(x, lens)
        if self.layer.pad is None:
            return x
        left, right = self.layer.pad
        return Q(nn.functional.pad(x.rows, (0, 0, left, right), value=x.zero_point), x.scale, x.zero_point)

    def __call__(self, x: Q, lens: torch.Tensor) -> tuple[Q, torch.Tensor]:
        return self.conv(self.input(x, lens)), self.layer.output_lengths(lens)


class Excite:
    """An int8 block's `SqueezeExcite`: fp32 on the dequantized rows, its product quantized by `requant`."""

    def __init__(self, layer: SqueezeExcite):
        if not isinstance(layer.requant, nnq.Quantize):
            raise Unsupported("squeeze-excite without its int8 requantization")
        self.fc, self.out = layer.fc, (float(layer.requant.scale), int(layer.requant.zero_point))

    def __call__(self, x: Q, lens: torch.Tensor) -> Q:
        mask_(x, lens)
        xf = dequantize(x)
        gate = torch.sigmoid(self.fc(xf.sum(1) / lens.unsqueeze(1).to(xf.dtype)))  # [B, C]
        return quantize(xf * gate.unsqueeze(1), *self.out)


class Block:
    """A `ConvBlock`: its layers in order, then each residual branch's conv added into the output."""

    def __init__(self, block: ConvBlock):
        if block.dense:  # Jasper's dense residual: no such model in the tests, so the modules run it
            raise Unsupported("a dense residual block")
        self.steps = []
        for layer in block.mconv:
            if isinstance(layer, MaskedConv):
                self.steps.append(Masked(layer))
            elif isinstance(layer, SqueezeExcite):
                self.steps.append(Excite(layer))
            elif type(layer) is not nn.Identity:
                raise Unsupported(type(layer).__name__)
        after = [m for m in block.mout if type(m) is not nn.Identity]  # a ReLU not fused into a residual add
        if not all(type(m) is nn.ReLU for m in after):
            raise Unsupported("an activation after the block other than ReLU")
        self.relu_after = bool(after)
        self.residual = []
        if block.res is not None:
            if block.skip is None:
                raise Unsupported("a residual add without its int8 add")
            for branch in block.res:
                convs = [m for m in branch if type(m) is not nn.Identity]
                if len(convs) != 1 or not isinstance(convs[0], MaskedConv):
                    raise Unsupported("a residual branch that is not one conv")
                self.residual.append(Masked(convs[0]))
            self.add = (float(block.skip.scale), int(block.skip.zero_point))
        self.relu = block.skip_relu

    def __call__(self, x: Q, lens: torch.Tensor) -> tuple[Q, torch.Tensor]:
        out, lens_in = x, lens
        for step in self.steps:
            if isinstance(step, Masked):
                out, lens = step(out, lens)
            else:
                out = step(out, lens)
        for branch in self.residual:  # one branch: dense residual blocks are not covered
            out = branch.conv.add_into(branch.input(x, lens_in), out, self.add, self.relu)
        if self.relu_after:  # a quantized ReLU: the zero point is 0.0
            out.rows.clamp_(min=out.zero_point)
        return out, lens


class DirectForward:
    """feats [B, F, T] fp32, lengths -> the decoder's logits [B, classes, T'] fp32, lengths, as
    `QuantizedEncoder.forward` computes them with no fp32 unit."""

    def __init__(self, qenc: nn.Module):
        if qenc.float_units or not isinstance(qenc.quant, nnq.Quantize) or type(qenc.decoder) is not nnq.Conv1d:
            raise Unsupported("fp32 units, or a decoder other than the CTC conv")
        self.quant = (float(qenc.quant.scale), int(qenc.quant.zero_point))
        self.blocks = [Block(b) for b in qenc.encoder.blocks]
        self.decoder = Conv(qenc.decoder)

    def __call__(self, feats: torch.Tensor, lens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = quantize(feats.transpose(1, 2).contiguous(), *self.quant)
        for block in self.blocks:
            x, lens = block(x, lens)
        return dequantize(self.decoder(x)).transpose(1, 2), lens
