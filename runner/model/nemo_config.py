"""NeMo model configs -> the lean model's description: the encoder (conv blocks or Conformer), the front end,
and every option the lean rebuild refuses, named with what to do. Reads plain dicts (the config of a `.nemo`
archive or of a restored model); never imports NeMo or torch."""

from __future__ import annotations

import math

from runner.errors import UnsupportedModelError
from runner.model.arch import BlockSpec, ConformerSpec, EncoderSpec, FeatureConfig


def _features_from_config(pcfg: dict, where: str) -> FeatureConfig:
    """`_features` from the config alone: AudioToMelSpectrogramPreprocessor's and FilterbankFeatures'
    defaults and derivations (NeMo 3.0); what NeMo refuses to build is refused too."""
    get = pcfg.get
    rate = get("sample_rate", 16000)
    size, stride = get("window_size", 0.02), get("window_stride", 0.01)  # seconds, or null and ...
    win, hop = get("n_window_size"), get("n_window_stride")  # ... samples
    exact_pad, guard = get("exact_pad", False), get("log_zero_guard_type", "add")
    problem = None
    if size and win:
        problem = "both window_size and n_window_size"
    elif stride and hop:
        problem = "both window_stride and n_window_stride"
    win = int(size * rate) if size else win
    hop = int(stride * rate) if stride else hop
    if problem is None and not (isinstance(win, int) and isinstance(hop, int) and win > 0 and hop > 0):
        problem = f"a window of {win!r} samples every {hop!r} (both must be positive ints)"
    elif problem is None and exact_pad and hop % 2 == 1:
        problem = f"exact_pad with an odd hop ({hop} samples)"
    elif problem is None and guard not in ("add", "clamp"):
        problem = f"log_zero_guard_type={guard!r} (add or clamp)"
    if problem:
        raise UnsupportedModelError(f"{where}: preprocessor with {problem}: NeMo refuses it too")
    if get("frame_splicing", 1) != 1:
        raise UnsupportedModelError(f"{where}: preprocessor frame_splicing={get('frame_splicing')} is not supported")
    return FeatureConfig(
        sample_rate=int(rate),
        win_length=win,
        hop_length=hop,
        n_fft=int(get("n_fft") or 2 ** math.ceil(math.log2(win))),
        window=get("window", "hann"),
        preemph=get("preemph", 0.97),
        n_mels=int(get("features", 64)),
        lowfreq=float(get("lowfreq", 0) or 0),
        highfreq=get("highfreq"),
        log=bool(get("log", True)),
        log_zero_guard_type=guard,
        log_zero_guard_value=get("log_zero_guard_value", 2**-24),
        mag_power=float(get("mag_power", 2.0)),
        normalize=get("normalize", "per_feature") or None,
        exact_pad=bool(exact_pad),
        pad_value=float(get("pad_value", 0)),
        mel_norm=get("mel_norm", "slaney"),
    )


def _encoder(ecfg: dict, where: str) -> EncoderSpec:
    norm = ecfg.get("normalization_mode", "batch")
    if norm != "batch":
        raise UnsupportedModelError(f"{where}: encoder normalization_mode={norm!r} (supported: 'batch')")
    if ecfg.get("frame_splicing", 1) != 1:
        raise UnsupportedModelError(f"{where}: encoder frame_splicing is not supported")
    default_mode = ecfg.get("residual_mode", "add")
    blocks = tuple(_block(i, b, default_mode, where) for i, b in enumerate(ecfg["jasper"]))
    return EncoderSpec(
        feat_in=int(ecfg["feat_in"]),
        activation=ecfg["activation"],
        blocks=blocks,
        conv_mask=bool(ecfg.get("conv_mask", True)),
    )


def _block(i: int, b: dict, default_mode: str, where: str) -> BlockSpec:
    for key, ok in (("groups", 1), ("heads", -1)):
        if b.get(key, ok) != ok:
            raise UnsupportedModelError(
                f"{where}: encoder block {i} uses {key}={b[key]!r}, which the lean model does not support"
            )
    mode = b.get("residual_mode", default_mode)
    if mode not in ("add", "stride_add"):
        raise UnsupportedModelError(f"{where}: encoder block {i} residual_mode={mode!r} is not supported")
    first = lambda v: int(v[0] if isinstance(v, (list, tuple)) else v)  # noqa: E731
    kernel = max(int(first(b["kernel"]) * float(b.get("kernel_size_factor", 1.0))), 1)
    kernel += 1 - kernel % 2  # NeMo rounds even kernels up to odd
    return BlockSpec(
        filters=int(b["filters"]),
        repeat=int(b["repeat"]),
        kernel=kernel,
        stride=first(b["stride"]),
        dilation=first(b["dilation"]),
        separable=bool(b.get("separable", False)),
        residual=bool(b["residual"]),
        residual_mode=mode,
        residual_dense=bool(b.get("residual_dense", False)),
        stride_last=bool(b.get("stride_last", False)),
        future_context=int(b.get("future_context", -1)),
        se=bool(b.get("se", False)),
        se_reduction_ratio=int(b.get("se_reduction_ratio", 8)),  # ConvASREncoder's default
        se_context_window=int(b.get("se_context_size", -1)),
    )


# Options of NeMo's ConformerEncoder the lean Conformer implements only at one value (or a few):
# (key, NeMo's default, accepted values). Stochastic depth and dropouts act only in training.
_CONFORMER_FIXED = (
    ("self_attention_model", "rel_pos", ("rel_pos",)),
    ("att_context_size", None, (None, [-1, -1])),
    ("conv_norm_type", "batch_norm", ("batch_norm",)),
    ("causal_downsampling", False, (False,)),
    ("subsampling", "striding", ("striding", "dw_striding")),
    ("subsampling_factor", 4, (2, 4, 8, 16)),
    ("reduction", None, (None,)),
    ("global_tokens", 0, (0,)),
    ("att_chunk_context_size", None, (None,)),
)


def check_conformer_options(ecfg: dict, where: str) -> None:
    """Raise `UnsupportedModelError` naming the first ConformerEncoder option the lean model lacks."""
    for key, default, accepted in _CONFORMER_FIXED:
        value = ecfg.get(key, default)
        if isinstance(value, tuple):
            value = list(value)
        if value not in accepted:
            raise UnsupportedModelError(
                f"{where}: encoder {key}={value!r} is not supported (supported: {', '.join(map(repr, accepted))}); "
                "the lean Conformer runs full-context rel_pos attention with batch-norm conv modules"
            )
    kernel = ecfg.get("conv_kernel_size", 31)
    context = ecfg.get("conv_context_size")
    if context is not None and not (isinstance(kernel, int) and list(context) == [(kernel - 1) // 2] * 2):
        raise UnsupportedModelError(
            f"{where}: encoder conv_context_size={context!r} is not supported "
            "(only null: symmetric, non-causal depthwise convolutions)"
        )


def _conformer_encoder(ecfg: dict, where: str) -> ConformerSpec:
    check_conformer_options(ecfg, where)
    return ConformerSpec(
        feat_in=int(ecfg["feat_in"]),
        n_layers=int(ecfg["n_layers"]),
        d_model=int(ecfg["d_model"]),
        n_heads=int(ecfg.get("n_heads", 4)),
        ff_expansion_factor=int(ecfg.get("ff_expansion_factor", 4)),
        subsampling_mode=ecfg.get("subsampling", "striding"),
        subsampling_factor=int(ecfg.get("subsampling_factor", 4)),
        subsampling_conv_channels=int(ecfg.get("subsampling_conv_channels", -1)),
        conv_kernel_size=int(ecfg.get("conv_kernel_size", 31)),
        xscaling=bool(ecfg.get("xscaling", True)),
        use_bias=bool(ecfg.get("use_bias", True)),
        feat_out=int(ecfg.get("feat_out", -1)),
    )
