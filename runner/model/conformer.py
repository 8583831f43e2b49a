"""The lean Conformer / FastConformer encoder: NeMo's `ConformerEncoder` rebuilt from plain torch.

Torch only (never imports NeMo). Module names below `encoder.` are NeMo's (`pre_encode.conv.N`,
`layers.N.self_attn.linear_q`, `layers.N.conv.depthwise_conv`, ...), so the weight mapping stays
a rename. One layout change: the conv module's pointwise convs are `nn.Linear` on [B, T, C]
(the same matrices with NeMo's trailing kernel dimension of 1 dropped on load), which saves two
transposes per layer and lets int8 treat them like the other projections.

Padding is handled as NeMo does it: the subsampling convs see zeros past each length, attention
never looks at padded keys (and padded queries give zeros), and the depthwise conv sees zeros in
padded frames. An utterance's fp32 output therefore does not depend on its batch.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from runner.model.arch import ConformerSpec

INF_VAL = 10000.0  # NeMo's fill value for masked attention scores


class ConvSubsampling(nn.Module):
    """NeMo's ConvSubsampling (`striding` or `dw_striding`, factor 2^n) with MaskedConvSequential's masking."""

    def __init__(self, spec: ConformerSpec):
        super().__init__()
        ch = spec.subsampling_conv_channels if spec.subsampling_conv_channels > 0 else spec.d_model
        steps = int(math.log2(spec.subsampling_factor))
        layers: list[nn.Module] = []
        if spec.subsampling_mode == "striding":
            for i in range(steps):
                layers += [nn.Conv2d(1 if i == 0 else ch, ch, 3, stride=2, padding=1), nn.ReLU(True)]
        else:  # dw_striding: a full conv first, then depthwise + pointwise pairs
            layers += [nn.Conv2d(1, ch, 3, stride=2, padding=1), nn.ReLU(True)]
            for _ in range(steps - 1):
                layers += [nn.Conv2d(ch, ch, 3, stride=2, padding=1, groups=ch), nn.Conv2d(ch, ch, 1), nn.ReLU(True)]
        self.conv = nn.Sequential(*layers)
        self.steps = steps
        freq = spec.feat_in
        for _ in range(steps):
            freq = (freq - 1) // 2 + 1
        self.out = nn.Linear(ch * freq, spec.d_model)

    def forward(self, feats: torch.Tensor, lens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """feats [B, F, T] -> [B, T', d_model] and lengths T'."""
        # Channels-last (NHWC) convs: 2-4x faster here than NCHW for the depthwise and pointwise
        # convs and ~1.5x for the first one (FastConformer large, batch 8 x 10 s: 367 -> ~170 ms).
        x = as_image(feats)
        for layer in self.conv:
            if isinstance(layer, nn.Conv2d) and layer.stride[0] > 1:
                if int(lens.min()) < x.shape[2]:
                    # Frames past the length are zero before every conv that mixes frames (NeMo
                    # multiplies by its mask before each layer; only these convs can read padding).
                    # (A product keeps channels-last; an out-of-place masked_fill returned NCHW.)
                    x = x * _valid(lens, x.shape[2]).view(x.shape[0], 1, -1, 1)
                x = layer(x)
                lens = subsampled_length(lens, 1)
            else:
                x = layer(x)
        return self.out(frames_of(x)), lens


def as_image(feats: torch.Tensor) -> torch.Tensor:
    """Features [B, F, T] -> a channels-last [B, 1, T, F] image for the subsampling convs."""
    return feats.transpose(1, 2).unsqueeze(1).contiguous(memory_format=torch.channels_last)


def frames_of(x: torch.Tensor) -> torch.Tensor:
    """Subsampling conv output [B, C, T', F'] -> [B, T', C * F'], NeMo's order for the output Linear."""
    b, c, t, f = x.shape
    return x.transpose(1, 2).reshape(b, t, c * f)


def subsampled_length(lens: torch.Tensor, steps: int) -> torch.Tensor:
    """Frames after `steps` strided convs (kernel 3, stride 2, padding 1 each), as NeMo counts them."""
    for _ in range(steps):
        lens = torch.div(lens + 2 - 3, 2, rounding_mode="floor") + 1
    return lens


def _valid(lens: torch.Tensor, length: int) -> torch.Tensor:
    """[B, length] True on frames inside each length."""
    return torch.arange(length, device=lens.device).unsqueeze(0) < lens.unsqueeze(1)


class FeedForward(nn.Module):
    def __init__(self, d_model: int, d_ff: int, bias: bool):
        super().__init__()
        self.linear1 = nn.Linear(d_model, d_ff, bias=bias)
        self.activation = nn.SiLU()
        self.linear2 = nn.Linear(d_ff, d_model, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear2(self.activation(self.linear1(x)))


class RelPositionAttention(nn.Module):
    """NeMo's RelPositionMultiHeadAttention (Transformer-XL scores, untied pos_bias_u/v per layer)."""

    def __init__(self, d_model: int, n_heads: int, bias: bool):
        super().__init__()
        self.h, self.d_k = n_heads, d_model // n_heads
        self.linear_q = nn.Linear(d_model, d_model, bias=bias)
        self.linear_k = nn.Linear(d_model, d_model, bias=bias)
        self.linear_v = nn.Linear(d_model, d_model, bias=bias)
        self.linear_out = nn.Linear(d_model, d_model, bias=bias)
        self.linear_pos = nn.Linear(d_model, d_model, bias=False)
        self.pos_bias_u = nn.Parameter(torch.zeros(n_heads, self.d_k))
        self.pos_bias_v = nn.Parameter(torch.zeros(n_heads, self.d_k))
        # The three matmuls' operand type: fp32, or bf16 in an int8 model on a CPU that multiplies bf16
        # natively (set by runner.int8.conformer_family); their results go back to fp32 before scaling and softmax.
        self.matmul_dtype = torch.float32

    def forward(
        self, x: torch.Tensor, pos_emb: torch.Tensor, key_bias: torch.Tensor | None, pad_mask: torch.Tensor | None
    ) -> torch.Tensor:
        """x [B, T, D], pos_emb [1, 2T-1, D]; key_bias [1, B, 1, T] (-10000 on padded keys) and
        pad_mask [B, T, 1] (True on padded frames), both None without padding.

        NeMo's scores, ((q+u)k^T + rel_shift((q+v)p^T)) / sqrt(d_k), computed head-major
        ([H * B, T, ...]): the positional product is then one [H, B*T, d_k] x [H, d_k, 2T-1] bmm
        instead of broadcasting p over the batch (a [B, H, d_k, 2T-1] copy per layer), and its
        shifted view is baddbmm's addend without a copy. Padding as in NeMo: a padded key's score
        is ~-10000 (its weight underflows to 0 either way) and a padded query's output is 0
        (NeMo zeroes its attention row), each one broadcast op instead of two [B, H, T, T]
        masked fills. (FastConformer large, int8, batch 8 x 10 s: the broadcast copy of p was 13 ms of
        564 in a torch.profiler run; the whole model then measured 709 -> 529 ms with the channels-last
        subsampling, best of 15 interleaved passes.)"""
        b, t, _ = x.shape
        h, d_k, mm = self.h, self.d_k, self.matmul_dtype
        q = self.linear_q(x).view(b, t, h, d_k).permute(2, 0, 1, 3)  # [H, B, T, d_k]
        k = _packed(self.linear_k(x).view(b, t, h, d_k).permute(2, 0, 3, 1), mm, h * b, d_k, t)
        v = _packed(self.linear_v(x).view(b, t, h, d_k).permute(2, 0, 1, 3), mm, h * b, t, d_k)
        p = self.linear_pos(pos_emb).view(-1, h, d_k).permute(1, 2, 0).to(mm)  # [H, d_k, 2T-1]
        qv = _packed(q + self.pos_bias_v.view(h, 1, 1, d_k), mm, h, b * t, d_k)
        bd = rel_shift(torch.bmm(qv, p).view(h, b, t, -1))  # [H, B, T, T] view
        qu = _packed(q + self.pos_bias_u.view(h, 1, 1, d_k), mm, h * b, t, d_k)
        scores = torch.baddbmm(bd.reshape(h * b, t, t), qu, k).view(h, b, t, t).float()
        scores = scores.mul_(1.0 / math.sqrt(d_k))
        if key_bias is not None:
            scores = scores.add_(key_bias)
        out = torch.bmm(torch.softmax(scores, dim=-1).to(mm).view(h * b, t, t), v).float()
        out = out.view(h, b, t, d_k).permute(1, 2, 0, 3).reshape(b, t, h * d_k)
        if pad_mask is not None:
            out = out.masked_fill(pad_mask, 0.0)
        return self.linear_out(out)


def _packed(x: torch.Tensor, dtype: torch.dtype, *shape: int) -> torch.Tensor:
    """`x` contiguous in `dtype`, viewed as `shape`: one copy (none if it already is), where a reshape and
    then a cast would make two."""
    if x.dtype == dtype and x.is_contiguous():
        return x.view(*shape)
    return torch.empty(x.shape, dtype=dtype).copy_(x).view(*shape)


def rel_shift(bd: torch.Tensor) -> torch.Tensor:
    """[X, Y, T, 2T-1] scores by relative position -> [X, Y, T, T] by key position.

    Same values as NeMo's pad-view-slice `rel_shift` followed by `[..., :T]`: out[i, j] =
    bd[i, T-1-i+j]. A strided view of the contiguous input, so no copy."""
    x, y, t, n = bd.shape
    bd = bd.contiguous()
    return bd.as_strided((x, y, t, t), (y * t * n, t * n, n - 1, 1), bd.storage_offset() + t - 1)


class ConformerConvolution(nn.Module):
    """pointwise (as Linear) -> GLU -> mask -> depthwise conv -> BatchNorm -> swish -> pointwise (as Linear)."""

    def __init__(self, d_model: int, kernel: int, bias: bool):
        super().__init__()
        self.pointwise_conv1 = nn.Linear(d_model, 2 * d_model, bias=bias)
        self.depthwise_conv = nn.Conv1d(d_model, d_model, kernel, padding=(kernel - 1) // 2, groups=d_model, bias=bias)
        self.batch_norm = nn.BatchNorm1d(d_model)
        self.activation = nn.SiLU()
        self.pointwise_conv2 = nn.Linear(d_model, d_model, bias=bias)
        self.register_load_state_dict_pre_hook(_squeeze_pointwise)

    def forward(self, x: torch.Tensor, pad_mask: torch.Tensor | None) -> torch.Tensor:
        """x [B, T, D]; pad_mask [B, T, 1] (True = padding) or None."""
        x = nn.functional.glu(self.pointwise_conv1(x), dim=-1)
        if pad_mask is not None:
            x = x.masked_fill(pad_mask, 0.0)
        # The depthwise conv and BatchNorm run on [B, T, C] as it lies, seen as a channels-last
        # [B, C, 1, T] image: no transposes, and the NHWC depthwise kernel is faster (FastConformer
        # large conv module: 12.2-12.6 -> 9.4-10.3 ms at batch 8 x 10 s, 1.8 -> 1.6-1.7 ms at batch 1).
        b, t, c = x.shape
        dw, bn = self.depthwise_conv, self.batch_norm
        y = nn.functional.conv2d(
            x.unsqueeze(1).permute(0, 3, 1, 2),
            dw.weight.unsqueeze(2),
            dw.bias,
            padding=(0, dw.padding[0]),
            groups=dw.groups,
        )
        y = nn.functional.batch_norm(y, bn.running_mean, bn.running_var, bn.weight, bn.bias, False, 0.0, bn.eps)
        return self.pointwise_conv2(self.activation(y).permute(0, 2, 3, 1).reshape(b, t, c))


def _squeeze_pointwise(module, state_dict, prefix, *_args) -> None:
    """NeMo stores the pointwise convs as Conv1d weights [out, in, 1]; the lean module is a Linear."""
    for name in ("pointwise_conv1.weight", "pointwise_conv2.weight"):
        w = state_dict.get(prefix + name)
        if w is not None and w.dim() == 3:
            state_dict[prefix + name] = w.squeeze(-1)


class ConformerLayer(nn.Module):
    """Macaron layer: x + FF/2, + self-attention, + conv module, + FF/2, then LayerNorm."""

    def __init__(self, spec: ConformerSpec):
        super().__init__()
        d, bias = spec.d_model, spec.use_bias
        self.norm_feed_forward1 = nn.LayerNorm(d)
        self.feed_forward1 = FeedForward(d, d * spec.ff_expansion_factor, bias)
        self.norm_conv = nn.LayerNorm(d)
        self.conv = ConformerConvolution(d, spec.conv_kernel_size, bias)
        self.norm_self_att = nn.LayerNorm(d)
        self.self_attn = RelPositionAttention(d, spec.n_heads, bias)
        self.norm_feed_forward2 = nn.LayerNorm(d)
        self.feed_forward2 = FeedForward(d, d * spec.ff_expansion_factor, bias)
        self.norm_out = nn.LayerNorm(d)

    def forward(self, x, pos_emb, key_bias, pad_mask):
        x = x + 0.5 * self.feed_forward1(self.norm_feed_forward1(x))
        x = x + self.self_attn(self.norm_self_att(x), pos_emb, key_bias, pad_mask)
        x = x + self.conv(self.norm_conv(x), pad_mask)
        x = x + 0.5 * self.feed_forward2(self.norm_feed_forward2(x))
        return self.norm_out(x)


class ConformerEncoder(nn.Module):
    """features [B, F, T] -> subsampling -> xscale -> Conformer layers -> [B, D, T']."""

    def __init__(self, spec: ConformerSpec):
        super().__init__()
        self.spec = spec
        self.pre_encode = ConvSubsampling(spec)
        self.layers = nn.ModuleList(ConformerLayer(spec) for _ in range(spec.n_layers))
        self.out_proj = nn.Linear(spec.d_model, spec.feat_out) if spec.out_channels != spec.d_model else None
        self.out_channels = spec.out_channels
        self.xscale = math.sqrt(spec.d_model) if spec.xscaling else None
        self._pe: torch.Tensor | None = None  # sinusoids for positions L-1 .. -(L-1), grown on demand

    def forward(self, feats: torch.Tensor, lens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x, lens = self.subsample(feats, lens)
        pos_emb, key_bias, pad_mask = self.context(x, lens)
        for layer in self.layers:
            x = layer(x, pos_emb, key_bias, pad_mask)
        return self.finish(x), lens

    def subsample(self, feats, lens):
        x, lens = self.pre_encode(feats, lens)
        return (x * self.xscale if self.xscale else x), lens

    def context(self, x: torch.Tensor, lens: torch.Tensor):
        """Relative position embeddings, the attention key bias and the padding mask (None without padding)."""
        t = x.shape[1]
        pos_emb = self.pos_emb(t).to(x.dtype)
        if int(lens.min()) >= t:
            return pos_emb, None, None
        valid = _valid(lens, t)
        key_bias = torch.zeros(valid.shape, dtype=x.dtype).masked_fill_(~valid, -INF_VAL)
        return pos_emb, key_bias.view(1, x.shape[0], 1, t), ~valid.unsqueeze(-1)

    def finish(self, x: torch.Tensor) -> torch.Tensor:
        if self.out_proj is not None:
            x = self.out_proj(x)
        return x.transpose(1, 2)

    def pos_emb(self, t: int) -> torch.Tensor:
        """[1, 2t-1, D] embeddings of positions t-1 .. -(t-1), computed as NeMo's RelPositionalEncoding does."""
        if self._pe is None or self._pe.shape[1] < 2 * t - 1:
            n = max(t, 512)
            positions = torch.arange(n - 1, -n, -1, dtype=torch.float32).unsqueeze(1)
            d = self.spec.d_model
            div_term = torch.exp(torch.arange(0, d, 2, dtype=torch.float32) * -(math.log(INF_VAL) / d))
            pe = torch.zeros(positions.shape[0], d)
            pe[:, 0::2] = torch.sin(positions * div_term)
            pe[:, 1::2] = torch.cos(positions * div_term)
            self._pe = pe.unsqueeze(0)
        center = self._pe.shape[1] // 2
        return self._pe[:, center - t + 1 : center + t]
