"""int8 post-training quantization of the lean model (eager mode): engines, observers, dispatch.

Every `torch.ao.quantization` use lives here and in the two family modules it dispatches to,
`conv_quant` (QuartzNet, Jasper, Citrinet) and `conformer_quant` ((Fast)Conformer: int8
subsampling convs and Linear layers, fp32 between them); static int8 in both, so a later move to
torchao's pt2e flow touches these modules. The mel front end stays fp32 (~1% of the time).
Observers: per-channel symmetric int8 weights, uint8 activations calibrated over the full 8-bit
range (`runner.observers`); the activation observer is chosen by measurement in `runner.calibrate`.

Activation bits depend on the CPU, not on the artifact (`activation_bits`): without VNNI, x86 int8
kernels (oneDNN, fbgemm) multiply u8 x s8 pairs into int16 with saturation (vpmaddubsw), and
full-range 8-bit activations overflow it (QuartzNet15x5 on an AVX2-only EPYC: logit cosine 0.80,
0% of frames agree with fp32). There, every activation scale is widened to the same calibrated
range on 7 bits (`with_activation_bits`), which cannot overflow (2 x 127 x 128 < 2^15): cosine
0.9997, 100% agreement. VNNI/AMX (int32 accumulation) and qnnpack keep 8 bits. Each family exposes prepare /
convert / with_float_units / int8_structure; "units" are the pieces the accuracy gate may keep
in fp32 (conv family: each block and the decoder; Conformers: the subsampling and each layer).

The converted state dict is engine-neutral (int8 weights, per-channel scales, activation scales
and zero points); `int8_structure` rebuilds the modules for any engine without fp32 weights,
and loading the state dict under an engine packs the weights for it (`load_int8`).
"""

from __future__ import annotations

import time
import warnings
from contextlib import contextmanager
from typing import Callable, Iterable, Optional, Sequence

import torch
from torch import nn

from .arch import ModelSpec
from .decoding import TextDecoder
from .model import LeanCTCModel

ENGINES = ("onednn", "x86", "fbgemm", "qnnpack")  # also `auto`'s preference order on near-ties
TIE_MARGIN = 0.10  # probes closer than this to the fastest count as ties


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


def _conformer(spec: ModelSpec) -> bool:
    """The Conformer family is quantized by `runner.conformer_quant` (int8 subsampling convs and Linear layers)."""
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


def _family(spec: ModelSpec):
    """The module holding this family's int8 structure: `conformer_quant` or `conv_quant`."""
    if _conformer(spec):
        from . import conformer_quant

        return conformer_quant
    from . import conv_quant

    return conv_quant


def prepare(model: LeanCTCModel, observer: str = "histogram") -> nn.Module:
    """Fused, observed copy of the encoder+decoder (`observer` for activations), ready for calibration."""
    return _family(model.spec).prepare(model, observer)


@torch.inference_mode()
def calibrate(qmodel: nn.Module, batches: Iterable[tuple[torch.Tensor, torch.Tensor]]) -> None:
    """Run (features, frames) batches of real audio through the observed model."""
    for feats, frames in batches:
        qmodel(feats, frames)


def convert(qmodel: nn.Module, engine: str) -> nn.Module:
    """Observed -> int8 modules packed for `engine`."""
    with quiet(), engine_scope(engine):
        return _family(qmodel.spec).convert(qmodel)


def with_float_units(qenc: nn.Module, model: LeanCTCModel, units: Iterable[int], engine: str) -> nn.Module:
    """A copy of the int8 `qenc` (packed for `engine`) in which `units` run the fp32 modules of
    `model` (shared, not copied)."""
    with quiet(), engine_scope(engine):  # copying repacks the int8 weights for the current engine
        return _family(model.spec).with_float_units(qenc, model, units)


def load_int8(spec: ModelSpec, state_dict: dict, engine: str, float_units: Sequence[int] = (),
              bits: Optional[int] = None) -> nn.Module:
    """Rebuild the int8 encoder for `engine` from an engine-neutral state dict, with `bits`-bit
    activations (default: what this CPU needs on `engine`, `activation_bits`)."""
    bits = activation_bits(engine) if bits is None else bits
    keep = _family(spec).eight_bit_outputs(spec, state_dict, engine)
    with quiet(), engine_scope(engine):
        qenc = _family(spec).int8_structure(spec, float_units)
        qenc.load_state_dict(with_activation_bits(state_dict, bits, keep), strict=True)
    qenc.activation_bits = bits
    return qenc.requires_grad_(False)


def rebuild(qenc: nn.Module, engine: str, bits: int) -> nn.Module:
    """`qenc` (calibrated at 8 bits, packed for `engine`) as it runs with `bits`-bit activations."""
    if bits == 8:
        return qenc
    return load_int8(qenc.spec, qenc.state_dict(), engine, sorted(qenc.float_units), bits)


VNNI_FLAGS = frozenset({"avx512_vnni", "avx_vnni", "amx_int8"})  # u8 x s8 products accumulate in int32
X86_MACHINES = frozenset({"x86_64", "amd64", "i386", "i686"})


# What `activation_bits` gives each kind of CPU (printed by `asr-runner quantize`).
BITS_BY_CPU_KIND = (("x86 with AVX-512 VNNI, AVX-VNNI or AMX: onednn, x86, fbgemm", 8),
                    ("x86 without VNNI (AVX2; AVX-512 without VNNI): onednn, x86, fbgemm", 7),
                    ("qnnpack (ARM; x86 only when no other engine exists)", 8))


def activation_bits(engine: str, cpu_flags: Optional[Sequence[str]] = None) -> int:
    """Activation bits for `engine` on this CPU: 7 where its int8 products can saturate, else 8.

    onednn, x86 and fbgemm on an x86 CPU without VNNI/AMX add pairs of u8 x s8 products into int16
    with saturation: 7 bits. With VNNI or AMX they accumulate in int32, and so does qnnpack: 8 bits.
    Decided from the CPU's flags (`sysinfo.int8_flags`, which a diagnostic override can replace);
    every worker then confirms it by measurement (`runner.int8_check`).
    """
    import platform

    from .sysinfo import int8_flags

    flags = set(int8_flags() if cpu_flags is None else cpu_flags)
    if engine == "qnnpack" or flags & VNNI_FLAGS or platform.machine().lower() not in X86_MACHINES:
        return 8
    return 7


def with_activation_bits(state_dict: dict, bits: int, keep: Iterable[str] = ()) -> dict:
    """The state dict with every activation scale / zero point (`X.scale` beside `X.zero_point`,
    `in_scale` beside `in_zero_point`) moved from the calibrated 8-bit grid to a `bits`-bit grid
    over the same range: [-zp * s, (255 - zp) * s] stays, with 2^bits - 1 steps. Weights (qint8,
    per-channel, packed in their own keys) are untouched. No re-calibration: the ranges are the
    calibrated ones. Scale keys in `keep` (outputs that no u8 x s8 product reads: the logits, each
    int8 Linear's output, what only a quantized add reads) keep their 8 bits."""
    if bits == 8:
        return state_dict
    levels, keep = 2 ** bits - 1, set(keep)
    out = state_dict.copy()
    if hasattr(state_dict, "_metadata"):  # module versions: quantized Linear reads its keys by them
        out._metadata = state_dict._metadata
    for key, scale in state_dict.items():
        if not key.endswith("scale") or key in keep:
            continue
        zp_key = key[: -len("scale")] + "zero_point"
        zero_point = state_dict.get(zp_key)
        if not (isinstance(scale, torch.Tensor) and isinstance(zero_point, torch.Tensor)) or scale.is_quantized \
                or not scale.is_floating_point() or zero_point.is_floating_point():
            continue
        out[key] = scale * (255 / levels)
        out[zp_key] = torch.round(zero_point.double() * levels / 255).clamp(0, levels).to(zero_point.dtype)
    return out


class Int8CTCModel(nn.Module):
    """fp32 features + int8 encoder/decoder, with the lean model's interface (`spec`, forward)."""

    def __init__(self, spec: ModelSpec, features: nn.Module, qencoder: nn.Module, engine: str):
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


def candidate_engines() -> list[str]:
    """Engines `auto` considers on this CPU: every x86 engine this torch has (each with the activation
    bits this CPU needs, so none of them saturates).

    qnnpack is the fallback only, when none of the others is available: its buffers grow with
    kernel size x input length (~7 GB for ONE 10 s utterance of QuartzNet15x5, and the driver
    was OOM-killed at 23 GB when a busy machine's 0.5 s probe had put qnnpack ahead and the
    accuracy gate then ran 30 s utterances on it), which a short probe cannot see.
    """
    engines = available_engines()
    return [e for e in engines if e != "qnnpack"] or engines
