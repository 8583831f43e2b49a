"""The conv family (QuartzNet, Jasper, Citrinet) as plain torch modules, in NeMo's layout.

Each block keeps NeMo's module order (`mconv` / `res` / `mout` with the same indices), which keeps
the weight mapping a prefix rename and lets the quantizer fuse Conv+BN(+ReLU) by name.
Padded frames get NeMo's masked-convolution treatment: a convolution that mixes frames sees
zeros past each utterance's length, so an utterance's output does not depend on its batch.
"""

from __future__ import annotations

import torch
from torch import nn

from runner.model.arch import BlockSpec, ModelSpec, same_padding

_ACTIVATIONS = {
    "identity": nn.Identity,
    "hardtanh": nn.Hardtanh,
    "relu": nn.ReLU,
    "selu": nn.SELU,
    "swish": nn.SiLU,
    "silu": nn.SiLU,
    "gelu": nn.GELU,
}


def make_activation(name: str) -> nn.Module:
    """In place where possible, as NeMo's ConvASREncoder does (one allocation less per layer)."""
    act = _ACTIVATIONS[name]()
    if hasattr(act, "inplace"):
        act.inplace = True
    return act


class MaskedConv(nn.Module):
    """Conv1d that zeroes frames past each length first (when it mixes frames) and tracks lengths."""

    def __init__(
        self,
        in_ch: int,
        out_ch: int,
        kernel: int,
        stride: int = 1,
        dilation: int = 1,
        padding: tuple[int, int] = (0, 0),
        groups: int = 1,
        use_mask: bool = True,
    ):
        super().__init__()
        left, right = padding
        self.pad = None if left == right else (left, right)
        self.conv = nn.Conv1d(
            in_ch,
            out_ch,
            kernel,
            stride=stride,
            dilation=dilation,
            padding=left if left == right else 0,
            groups=groups,
            bias=False,
        )
        # A 1x1 stride-1 conv never mixes frames: masking would change only padded outputs.
        self.use_mask = use_mask and (kernel > 1 or stride > 1)
        self.keeps_length = stride == 1 and left + right == dilation * (kernel - 1)

    def output_lengths(self, lens: torch.Tensor) -> torch.Tensor:
        if self.keeps_length:
            return lens
        c = self.conv
        total_pad = sum(self.pad) if self.pad else 2 * c.padding[0]
        span = c.dilation[0] * (c.kernel_size[0] - 1)
        return torch.div(lens + total_pad - span - 1, c.stride[0], rounding_mode="trunc") + 1

    def forward(self, x: torch.Tensor, lens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.use_mask and int(lens.min()) < x.shape[-1]:
            # Zero the padded frames in place (masked_fill_, not NeMo's multiply: the same zeros, no
            # copy, and it works on int8 tensors). In place is safe: only padded frames change, and
            # nothing reads them for a valid output (every frame-mixing conv masks its input first;
            # the 1x1 residual convs that share this input act frame by frame). No padding: no mask.
            zero_padding_(x, lens)
        if self.pad is not None:
            x = nn.functional.pad(x, self.pad)
        return conv_channels_last(self.conv, x), self.output_lengths(lens)


def conv_channels_last(conv: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """`conv(x)` for a float `x` [B, C, T], computed as a (1, K) conv2d on channels-last tensors; the output
    is [B, C, T] with stride 1 on C (channels-last), which the next conv, the BatchNorm (`batch_norm`),
    ReLU, residual add and masking keep.

    oneDNN runs a float conv1d on [B, C, T]-contiguous tensors through a slow generic path: a depthwise
    conv of QuartzNet15x5 (kernel 75, [8, 512, 300]) took 38 ms, 3.1 ms channels-last (AMD EPYC avx2,
    2 threads); the outputs agree to float rounding (logits within 4e-7). `conv` is an nn.Conv1d, or a
    fused ConvReLU1d while calibrating: its forward hooks (the observers) run on the output as
    `nn.Module.__call__` runs them. Anything else (int8 modules, pre-hooks) goes through the module."""
    parts = None if x.is_quantized else _plain_conv(conv)
    if parts is None:
        return conv(x)
    inner, rest = parts
    y = nn.functional.conv2d(
        x.unsqueeze(2).contiguous(memory_format=torch.channels_last),
        inner.weight.unsqueeze(2),
        inner.bias,
        (1, inner.stride[0]),
        (0, inner.padding[0]),
        (1, inner.dilation[0]),
        inner.groups,
    ).squeeze(2)
    for module in rest:  # a fused module's ReLU, then what else it holds, in order, as nn.Sequential runs them
        y = module(y)
    for hook in conv._forward_hooks.values():
        out = hook(conv, (x,), y)
        if out is not None:
            y = out
    return y


def _plain_conv(conv: nn.Module) -> tuple[nn.Conv1d, list[nn.Module]] | None:
    """(the Conv1d, the modules that follow it) when `conv` is an nn.Conv1d, or a fused Conv1d+ReLU
    (nn.Sequential) and, while calibrating, its observer: torch's eager prepare adds that as a child, which
    Sequential runs after the ReLU, and as a forward hook (each tensor is observed twice; kept so);
    hooks only on the whole. Else None."""
    if conv._forward_pre_hooks or getattr(conv, "_forward_hooks_with_kwargs", None):
        return None
    if type(conv) is nn.Conv1d:
        inner, rest = conv, []
    elif (
        isinstance(conv, nn.Sequential)
        and list(conv._modules)[:2] == ["0", "1"]
        and set(list(conv._modules)[2:]) <= {"activation_post_process"}
        and type(conv[0]) is nn.Conv1d
        and type(conv[1]) is nn.ReLU
    ):
        inner, rest = conv[0], list(conv)[1:]
        if any(m._forward_hooks or m._forward_pre_hooks for m in conv):
            return None
    else:
        return None
    if inner.padding_mode != "zeros" or isinstance(inner.padding, str):
        return None
    return inner, rest


def batch_norm(bn: nn.BatchNorm1d, x: torch.Tensor) -> torch.Tensor:
    """An eval-mode BatchNorm1d that keeps a channels-last [B, C, T] layout (the module itself would hand
    back a [B, C, T]-contiguous copy, and the next conv would convert it again)."""
    if x.is_quantized or x.stride(1) != 1 or bn.training or bn._forward_hooks or bn._forward_pre_hooks:
        return bn(x)
    return nn.functional.batch_norm(
        x.unsqueeze(2), bn.running_mean, bn.running_var, bn.weight, bn.bias, False, 0.0, bn.eps
    ).squeeze(2)


def zero_padding_(x: torch.Tensor, lens: torch.Tensor, zero: float = 0.0) -> None:
    """Zero the frames of `x` [B, C, T] past each length, in place. `zero` is what zero is stored as: 0.0, or
    the zero point of plain uint8 int8 activations (`runner.int8.direct`)."""
    if x.stride(1) == 1 and x.shape[1] > 1:
        # Channels-last (int8 activations of oneDNN convs, the float path's `conv_channels_last`): each
        # row's padded frames are one contiguous run; fill_ on it is ~6x faster than (quantized) masked_fill_.
        rows = x.transpose(1, 2)
        for i, n in enumerate(lens.tolist()):
            if n < x.shape[-1]:
                rows[i, n:].fill_(zero)
    else:
        x.masked_fill_(~time_mask(lens, x.shape[-1]), zero)


def time_mask(lens: torch.Tensor, length: int) -> torch.Tensor:
    """[B, 1, length] boolean mask of valid frames."""
    return (torch.arange(length, device=lens.device).unsqueeze(0) < lens.unsqueeze(1)).unsqueeze(1)


class SqueezeExcite(nn.Module):
    """NeMo's SqueezeExcite (Citrinet), eval mode: each channel scaled by a gate computed from its
    mean over the utterance's valid frames, so the output does not depend on the batch's padding.

    `fc` keeps NeMo's layout (Linear, activation, Linear; no biases), so weights map by name. In an
    int8 block the SE runs in fp32 on the dequantized conv output and `requant` (set by
    `runner.int8.model`) quantizes its product: measured faster than a quantized gate product at
    the same accuracy (see `runner.int8.model`)."""

    def __init__(self, channels: int, reduction_ratio: int, activation: str):
        super().__init__()
        hidden = channels // reduction_ratio
        self.fc = nn.Sequential(
            nn.Linear(channels, hidden, bias=False),
            make_activation(activation),
            nn.Linear(hidden, channels, bias=False),
        )
        self.requant = None  # set by runner.int8.model: QuantStub (observed), then Quantize (int8)

    def forward(self, x: torch.Tensor, lens: torch.Tensor) -> torch.Tensor:
        # NeMo zeroes the padded frames, then divides each channel's sum by the valid frame count.
        # In place is safe here: x is the BN output (or an int8 conv output) that only this module reads.
        zero_padding_(x, lens)
        # int8 conv outputs of oneDNN are channels-last ([B, C, T] with stride 1 on C): keep that layout
        # through dequantize/quantize (which would make it [B, C, T]-contiguous), so that the residual
        # add that follows stays on its fast path (one strided operand made it ~10x slower there).
        channels_last = x.is_quantized and x.stride(1) == 1
        if channels_last:
            x = x.transpose(1, 2).dequantize().transpose(1, 2)
        elif x.is_quantized:
            x = x.dequantize()
        gate = torch.sigmoid(self.fc(x.sum(-1) / lens.unsqueeze(1).to(x.dtype))).unsqueeze(-1)  # [B, C, 1]
        out = x * gate
        if self.requant is None:
            return out
        return self.requant(out.transpose(1, 2)).transpose(1, 2) if channels_last else self.requant(out)


class ConvBlock(nn.Module):
    """One Jasper/QuartzNet block, with NeMo JasperBlock's module layout."""

    def __init__(self, spec: BlockSpec, in_ch: int, activation: str, res_panes: list[int], use_mask: bool = True):
        super().__init__()
        self.spec = spec
        self.dense = spec.residual and spec.residual_dense and bool(res_panes)
        pad = same_padding(spec)
        layers, ch = [], in_ch
        for i in range(spec.repeat):
            last = i == spec.repeat - 1
            stride = spec.stride if (last or not spec.stride_last) else 1
            layers += self._conv_bn(ch, spec.filters, spec.kernel, stride, spec.dilation, pad, use_mask)
            if not last:
                layers += [make_activation(activation), nn.Identity()]  # Identity: NeMo's dropout slot
            ch = spec.filters
        if spec.se:
            layers.append(SqueezeExcite(spec.filters, spec.se_reduction_ratio, activation))
        self.mconv = nn.ModuleList(layers)
        self.res = None
        if spec.residual:
            panes = res_panes if self.dense else [in_ch]
            res_stride = spec.stride if spec.residual_mode == "stride_add" else 1
            self.res = nn.ModuleList(
                nn.ModuleList(self._conv_bn(p, spec.filters, 1, res_stride, 1, (0, 0), use_mask, False)) for p in panes
            )
        self.mout = nn.Sequential(make_activation(activation), nn.Identity())
        self.skip = None  # set by runner.int8.model: a FloatFunctional for the int8 residual add
        self.skip_relu = False  # True when the block's ReLU is fused into that add

    def _conv_bn(self, cin, cout, kernel, stride, dilation, pad, use_mask, separable=None):
        separable = self.spec.separable if separable is None else separable
        if separable:
            convs = [
                MaskedConv(cin, cin, kernel, stride, dilation, pad, groups=cin, use_mask=use_mask),
                MaskedConv(cin, cout, 1, use_mask=use_mask),
            ]
        else:
            convs = [MaskedConv(cin, cout, kernel, stride, dilation, pad, use_mask=use_mask)]
        return convs + [nn.BatchNorm1d(cout, eps=1e-3)]

    def forward(self, xs: list[torch.Tensor], lens: torch.Tensor):
        out, lens_in = xs[-1], lens
        for layer in self.mconv:
            if isinstance(layer, MaskedConv):
                out, lens = layer(out, lens)
            elif isinstance(layer, SqueezeExcite):
                out = layer(out, lens)
            elif type(layer) is nn.BatchNorm1d:
                out = batch_norm(layer, out)
            else:
                out = layer(out)
        if self.res is not None:
            for x, branch in zip(xs, self.res):
                for layer in branch:
                    if isinstance(layer, MaskedConv):
                        x = layer(x, lens_in)[0]
                    else:
                        x = batch_norm(layer, x) if type(layer) is nn.BatchNorm1d else layer(x)
                out = self.add_residual(out, x)
        out = self.mout(out)
        return (xs + [out] if self.dense else [out]), lens

    def add_residual(self, out: torch.Tensor, res: torch.Tensor) -> torch.Tensor:
        if self.skip is not None:  # int8: quantized add (with the ReLU fused in when possible)
            if out.stride(1) == 1 and res.stride(1) == 1:
                # Both channels-last (oneDNN conv outputs): the quantized add is 20x faster on the
                # contiguous [B, T, C] views than on strided [B, C, T] tensors.
                out, res = out.transpose(1, 2), res.transpose(1, 2)
                summed = self.skip.add_relu(out, res) if self.skip_relu else self.skip.add(out, res)
                return summed.transpose(1, 2)
            return self.skip.add_relu(out, res) if self.skip_relu else self.skip.add(out, res)
        return out + res


class ConvEncoder(nn.Module):
    def __init__(self, spec: ModelSpec):
        super().__init__()
        enc = spec.encoder
        blocks, ch, panes = [], enc.feat_in, []
        for b in enc.blocks:
            if b.residual_dense:
                panes.append(ch)
            blocks.append(ConvBlock(b, ch, enc.activation, list(panes), enc.conv_mask))
            ch = b.filters
        self.blocks = nn.ModuleList(blocks)
        self.out_channels = ch

    def forward(self, feats: torch.Tensor, lens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        xs = [feats]
        for block in self.blocks:
            xs, lens = block(xs, lens)
        return xs[-1], lens
