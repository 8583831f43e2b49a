"""int8 post-training static quantization of the lean model (eager mode): the mechanics.

Every `torch.ao.quantization` call lives here, so a later move to torchao's pt2e flow touches
one module. The mel front end stays fp32 (~1% of the time); the encoder blocks and the decoder
run int8 between a QuantStub (on the features) and a DeQuantStub (before log-softmax).
Recipe: fuse Conv+BN(+ReLU) -> residual adds as FloatFunctional (add+ReLU fused) -> squeeze-excite
(Citrinet) in fp32 with its product requantized -> observers
(per-channel symmetric int8 weights, full-range uint8 activations; the activation observer is
chosen by measurement in `runner.calibrate`) -> calibrate on real audio -> convert.

"Units" are the pieces the accuracy gate may keep in fp32: each encoder block and the decoder.
A unit kept in fp32 is the original float module between a dequantize and a requantize with the
int8 model's own scale at that border (recorded as `in_scale`/`in_zero_point`), so keeping a
unit in fp32 needs no second calibration.

The converted state dict is engine-neutral (int8 weights, per-channel scales, activation scales
and zero points); `int8_structure` rebuilds the modules for any engine without fp32 weights,
and loading the state dict under an engine packs the weights for it.
"""

from __future__ import annotations

import copy
import time
import warnings
from contextlib import contextmanager
from typing import Callable, Iterable, Optional, Sequence

import torch
from torch import nn

from .arch import ModelSpec
from .decoding import TextDecoder
from .model import ConvBlock, LeanCTCModel, MaskedConv, SqueezeExcite

ENGINES = ("onednn", "x86", "fbgemm", "qnnpack")  # also `auto`'s preference order on near-ties
TIE_MARGIN = 0.10  # probes closer than this to the fastest count as ties
OBSERVERS = ("histogram", "minmax", "moving_average")


@contextmanager
def quiet():
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


def available_engines() -> list[str]:
    """The engines of `ENGINES` this torch build has, in our preference order."""
    have = set(torch.backends.quantized.supported_engines)
    return [e for e in ENGINES if e in have]


def check_engine(engine: str) -> None:
    if engine not in ENGINES:
        raise ValueError(f"engine must be one of auto, {', '.join(ENGINES)}; got {engine!r}")
    if engine not in torch.backends.quantized.supported_engines:
        raise ValueError(f"engine {engine!r} is not available in this torch build "
                         f"(available: {', '.join(available_engines())})")


class QuantizedEncoder(nn.Module):
    """QuantStub -> encoder blocks -> decoder conv -> DeQuantStub; some units may stay fp32."""

    def __init__(self, model: LeanCTCModel):
        super().__init__()
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

    def unit_names(self) -> list[str]:
        return [f"encoder.blocks.{i}" for i in range(len(self.encoder.blocks))] + ["decoder"]

    def units(self) -> list[nn.Module]:
        return list(self.encoder.blocks) + [self.decoder]

    def forward(self, feats: torch.Tensor, lens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if not self.float_units:
            enc, lens = self.encoder(self.quant(feats), lens)
            return self.dequant(self.decoder(enc)), lens
        x, quantized = feats, False
        for k, unit in enumerate(self.units()):
            if k in self.float_units:
                if quantized:
                    x, quantized = x.dequantize(), False
            elif not quantized:
                x = self.quant(x) if k == 0 else torch.quantize_per_tensor(
                    x, float(self.in_scale[k]), int(self.in_zero_point[k]), torch.quint8)
                quantized = True
            if isinstance(unit, ConvBlock):
                xs, lens = unit([x], lens)
                x = xs[-1]
            else:
                x = unit(x)
        return (x.dequantize() if quantized else x), lens


def _conformer(spec: ModelSpec) -> bool:
    """The Conformer family is quantized by `runner.conformer_quant` (static int8 subsampling, dynamic int8 Linear)."""
    return spec.family == "conformer-ctc"


def probe_frames(spec: ModelSpec) -> int:
    """Feature frames `auto` times each engine on. 0.5 s ranks engines right for the conv family
    (QuartzNet15x5: the same order as on 10 s utterances). A Conformer sees only ~6 frames of 0.5 s
    after 8x subsampling, too few to rank its int8 matmuls (on FastConformer-CTC large a 0.5 s probe
    put `x86` first, while `onednn` is the fastest on 10 s utterances), so Conformers probe 10 s."""
    return 1000 if _conformer(spec) else 50


def fallback_possible(spec: ModelSpec) -> bool:
    """Units can be kept in fp32 one by one unless blocks feed later ones densely (Jasper DR)."""
    if _conformer(spec):
        return True
    return not any(b.residual and b.residual_dense for b in spec.encoder.blocks)


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


def qconfig(observer: str = "histogram"):
    """Per-channel symmetric int8 weights (every engine's choice) and full-range uint8 activations.

    Full range (no `reduce_range`) keeps one artifact valid for every engine; x86/fbgemm kernels
    can saturate with it on CPUs without VNNI, which is why `auto` skips them there.
    """
    from torch.ao.quantization import (HistogramObserver, MinMaxObserver, MovingAverageMinMaxObserver, QConfig,
                                       default_per_channel_weight_observer)

    activations = {
        "histogram": HistogramObserver.with_args(reduce_range=False),
        "minmax": MinMaxObserver.with_args(reduce_range=False),
        "moving_average": MovingAverageMinMaxObserver.with_args(averaging_constant=0.01, reduce_range=False),
    }
    if observer not in activations:
        raise ValueError(f"observer must be one of {', '.join(OBSERVERS)}, got {observer!r}")
    return QConfig(activation=activations[observer], weight=default_per_channel_weight_observer)


def prepare(model: LeanCTCModel, observer: str = "histogram") -> QuantizedEncoder:
    """Fused, observed copy of the encoder+decoder, ready for calibration."""
    from torch.ao.quantization import QuantStub, fuse_modules, prepare as ao_prepare
    from torch.ao.nn.quantized import FloatFunctional

    if _conformer(model.spec):
        from . import conformer_quant

        return conformer_quant.prepare(model, observer)
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


@torch.inference_mode()
def calibrate(qmodel: QuantizedEncoder, batches: Iterable[tuple[torch.Tensor, torch.Tensor]]) -> None:
    """Run (features, frames) batches of real audio through the observed model."""
    for feats, frames in batches:
        qmodel(feats, frames)


def convert(qmodel: QuantizedEncoder, engine: str) -> QuantizedEncoder:
    """Observed -> int8 modules packed for `engine`, with each unit's input scale recorded."""
    from torch.ao.quantization import convert as ao_convert

    from . import conformer_quant

    if isinstance(qmodel, conformer_quant.QuantizedConformer):
        with quiet(), engine_scope(engine):
            return conformer_quant.convert(qmodel)
    with quiet(), engine_scope(engine):
        converted = ao_convert(qmodel.eval(), inplace=False)
        _record_unit_inputs(converted, qmodel)
    return converted


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


def with_float_units(qenc: QuantizedEncoder, model: LeanCTCModel, units: Iterable[int],
                     engine: str) -> QuantizedEncoder:
    """A copy of the int8 `qenc` (packed for `engine`) in which `units` run the fp32 modules of
    `model` (shared, not copied)."""
    units = frozenset(units)
    if _conformer(model.spec):
        from . import conformer_quant

        with quiet(), engine_scope(engine):
            return conformer_quant.with_float_units(qenc, model, units)
    with quiet(), engine_scope(engine):  # copying repacks the int8 weights for the current engine
        hybrid = copy.deepcopy(qenc)
    for k in units:
        if k == len(model.encoder.blocks):
            hybrid.decoder = model.decoder
        else:
            hybrid.encoder.blocks[k] = model.encoder.blocks[k]
    hybrid.float_units = units
    return hybrid


def int8_structure(spec: ModelSpec, engine: str, float_units: Sequence[int] = ()) -> QuantizedEncoder:
    """The converted module structure for `spec`, built directly (no fp32 weights, no calibration).

    Load an artifact's state dict into it under `engine_scope(engine)` to get the int8 model.
    """
    import torch.ao.nn.intrinsic.quantized as nniq
    import torch.ao.nn.quantized as nnq

    with torch.device("meta"):
        skeleton = LeanCTCModel(spec)
    qenc = QuantizedEncoder(skeleton)
    qenc.in_scale = torch.ones(len(qenc.in_scale), dtype=torch.float64)
    qenc.in_zero_point = torch.zeros(len(qenc.in_zero_point), dtype=torch.int64)
    with quiet(), engine_scope(engine):
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


def _qconv(cls, conv: nn.Conv1d, bias: bool):
    return cls(conv.in_channels, conv.out_channels, conv.kernel_size[0], stride=conv.stride[0],
               padding=conv.padding[0], dilation=conv.dilation[0], groups=conv.groups, bias=bias)


def _get(root: nn.Module, name: str) -> nn.Module:
    return root.get_submodule(name)


def _set(root: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, leaf = name.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, leaf, module)


def load_int8(spec: ModelSpec, state_dict: dict, engine: str, float_units: Sequence[int] = ()) -> QuantizedEncoder:
    """Rebuild the int8 encoder for `engine` from an engine-neutral state dict."""
    if _conformer(spec):
        from . import conformer_quant

        with quiet(), engine_scope(engine):
            qenc = conformer_quant.int8_structure(spec, float_units)
    else:
        qenc = int8_structure(spec, engine, float_units)
    with quiet(), engine_scope(engine):
        qenc.load_state_dict(state_dict, strict=True)
    return qenc.requires_grad_(False)


class Int8CTCModel(nn.Module):
    """fp32 features + int8 encoder/decoder, with the lean model's interface (`spec`, forward)."""

    def __init__(self, spec: ModelSpec, features: nn.Module, qencoder: QuantizedEncoder, engine: str):
        super().__init__()
        self.spec = spec
        self.features = features
        self.qencoder = qencoder
        self.engine = engine
        self.text_decoder = TextDecoder.from_spec(spec)  # token ids -> text, built once per model

    def forward(self, audio: torch.Tensor, lengths: torch.Tensor):
        feats, frames = self.features(audio, lengths)
        return self.forward_features(feats, frames)

    def forward_features(self, feats: torch.Tensor, frames: torch.Tensor):
        logits, lens = self.logits(feats, frames)
        return torch.log_softmax(logits.transpose(1, 2), dim=-1), lens

    def logits(self, feats: torch.Tensor, frames: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Decoder output [B, C, T'] before log-softmax (what the accuracy gate compares), and lengths."""
        with quiet(), engine_scope(self.engine):
            return self.qencoder(feats, frames)


@torch.inference_mode()
def time_engines(build: Callable[[str], Callable[[torch.Tensor, torch.Tensor], object]], feat_in: int,
                 engines: Sequence[str], frames_per_second: float = 100.0, frames: int = 50, rounds: int = 3,
                 budget_seconds: float = 0.3) -> dict[str, float]:
    """Seconds each engine needs per second of audio, probed on `frames` feature frames (0.5 s).

    `build(engine)` returns a callable(feats, lens). Engines are tried one at a time in preference
    order and each is released before the next is built (peak memory = one engine's, not all of
    them: qnnpack's buffers alone can be hundreds of MB). Each first runs a short pass (16 frames)
    that absorbs first-call set-up; one whose short pass takes over 10x the fastest short pass so
    far is recorded at that time, scaled to `frames` (an estimate), and dropped: a slow engine costs
    one short pass. (Comparing it with the others' full probes instead made a long probe drop fast
    engines: a few ms of set-up x frames / 16.) The others run one untimed pass at the probe's shape (kernels are set up per shape), then
    up to `rounds` timed passes within their share of `budget_seconds`; the best pass counts.
    """
    torch.manual_seed(0)
    feats, lens = torch.randn(1, feat_in, frames), torch.tensor([frames])
    short, short_lens = feats[:, :, :16], torch.tensor([16])
    timings: dict[str, float] = {}
    shorts: dict[str, float] = {}  # short passes are compared with short passes (both pay first-call set-up)
    for engine in engines:
        with engine_scope(engine):
            run = build(engine)
            t0 = time.perf_counter()
            run(short, short_lens)
            shorts[engine] = time.perf_counter() - t0
            if len(shorts) > 1 and shorts[engine] > 10 * min(shorts.values()):
                timings[engine] = shorts[engine] * frames / 16  # an estimate: it is not probed further
                del run
                continue
            run(feats, lens)
            passes: list[float] = []
            while len(passes) < rounds and sum(passes) < budget_seconds / len(engines):
                t0 = time.perf_counter()
                run(feats, lens)
                passes.append(time.perf_counter() - t0)
            timings[engine] = min(passes)
            del run
    audio_seconds = frames / frames_per_second
    return {e: t / audio_seconds for e, t in timings.items()}


def choose_engine(timings: dict[str, float], tie: float = TIE_MARGIN) -> str:
    """The engine `auto` keeps: the first in `ENGINES` order whose probe is within `tie` of the fastest.

    A 0.5 s probe on a busy machine can put a slow engine a few percent ahead (qnnpack once beat
    onednn 0.028 s to 0.029 s under load, then ran real shards several times slower with 3x the
    memory); near-ties go to the engine that is fastest on long inputs here, onednn."""
    best = min(timings.values())
    return next(e for e in sorted(timings, key=ENGINES.index) if timings[e] <= best * (1 + tie))


def candidate_engines(cpu_flags: Optional[Sequence[str]] = None) -> list[str]:
    """Engines `auto` considers on this CPU.

    The artifact uses full-range uint8 activations; fbgemm/x86 multiply them in 16-bit
    intermediates that can saturate unless the CPU has VNNI, so there they are left out.
    qnnpack is the fallback only, when none of the others is available: its buffers grow with
    kernel size x input length (~7 GB for ONE 10 s utterance of QuartzNet15x5, and the driver
    was OOM-killed at 23 GB when a busy machine's 0.5 s probe had put qnnpack ahead and the
    accuracy gate then ran 30 s utterances on it), which a short probe cannot see.
    """
    if cpu_flags is None:
        from .sysinfo import cpu_info

        cpu_flags = cpu_info()["flags"]
    vnni = bool({"avx512_vnni", "avx_vnni", "amx_int8"} & set(cpu_flags))
    engines = [e for e in available_engines() if vnni or e not in ("x86", "fbgemm")]
    return [e for e in engines if e != "qnnpack"] or engines
