"""The int8 model: eager post-training quantization of the lean model, dispatched by family.

Every `torch.ao.quantization` use lives in `runner.int8` (this module, `observers` and the two
family modules it dispatches to: `conv_family` (QuartzNet, Jasper, Citrinet) and
`conformer_family` ((Fast)Conformer: int8
subsampling convs and Linear layers, fp32 between them); static int8 in both, so a later move to
torchao's pt2e flow touches these modules. The mel front end stays fp32 (~1% of the time).
Observers: per-channel symmetric int8 weights, uint8 activations calibrated over the full 8-bit
range (`runner.int8.observers`); the activation observer is chosen by measurement in `runner.int8.pipeline`.

Activation bits depend on the CPU, not on the artifact (`runner.int8.engines.activation_bits`):
where 8-bit activations could saturate, every activation scale is widened to the same calibrated
range on 7 bits (`with_activation_bits`). Each family exposes prepare /
convert / with_float_units / int8_structure; "units" are the pieces the accuracy gate may keep
in fp32 (conv family: each block and the decoder; Conformers: the subsampling and each layer).

The converted state dict is engine-neutral (int8 weights, per-channel scales, activation scales
and zero points); `int8_structure` rebuilds the modules for any engine without fp32 weights,
and loading the state dict under an engine packs the weights for it (`load_int8`).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch
from torch import nn

from runner.int8 import conformer_family, conv_family, direct
from runner.int8.engines import activation_bits, engine_scope
from runner.int8.observers import quiet
from runner.model.arch import ModelSpec
from runner.model.ctc import LeanModel, LogitReader, ReadsLogits


def _conformer(spec: ModelSpec) -> bool:
    """The Conformer family is quantized by `runner.int8.conformer_family` (int8 subsampling convs and Linears)."""
    return spec.family == "conformer-ctc"


def fallback_possible(spec: ModelSpec) -> bool:
    """Units can be kept in fp32 one by one unless blocks feed later ones densely (Jasper DR)."""
    if _conformer(spec):
        return True
    return not any(b.residual and b.residual_dense for b in spec.encoder.blocks)


def _family(spec: ModelSpec):
    """The module holding this family's int8 structure: `conformer_family` or `conv_family`."""
    if _conformer(spec):
        return conformer_family

    return conv_family


def prepare(model: LeanModel, observer: str = "histogram") -> nn.Module:
    """Fused, observed copy of the encoder+decoder (`observer` for activations), ready for calibration."""
    return _family(model.spec).prepare(model, observer)


@torch.inference_mode()
def calibrate(qmodel: nn.Module, batches: Iterable[tuple[torch.Tensor, torch.Tensor]]) -> None:
    """Run (features, frames) batches of real audio through the observed model."""
    for feats, frames in batches:
        qmodel(feats, frames)


def convert(qmodel: nn.Module, engine: str) -> nn.Module:
    """Observed -> int8 modules packed for `engine`, running the forward a worker's rebuild of them runs
    (`load_int8`), so that what the gate measures is what workers run."""
    with quiet(), engine_scope(engine):
        qenc = _family(qmodel.spec).convert(qmodel)
    if not _conformer(qmodel.spec):
        qenc.direct = direct.applies(engine)
    return qenc


def with_float_units(qenc: nn.Module, model: LeanModel, units: Iterable[int], engine: str) -> nn.Module:
    """A copy of the int8 `qenc` (packed for `engine`) in which `units` run the fp32 modules of
    `model` (shared, not copied)."""
    with quiet(), engine_scope(engine):  # copying repacks the int8 weights for the current engine
        return _family(model.spec).with_float_units(qenc, model, units)


def load_int8(
    spec: ModelSpec, state_dict: dict, engine: str, float_units: Sequence[int] = (), bits: int | None = None
) -> nn.Module:
    """Rebuild the int8 encoder for `engine` from an engine-neutral state dict, with `bits`-bit
    activations (default: what this CPU needs on `engine`, `activation_bits`)."""
    bits = activation_bits(engine) if bits is None else bits
    keep = _family(spec).eight_bit_outputs(spec, state_dict, engine)
    with quiet(), engine_scope(engine):
        qenc = _family(spec).int8_structure(spec, float_units)
        qenc.load_state_dict(with_activation_bits(state_dict, bits, keep), strict=True)
        if not _conformer(spec):
            qenc = conv_family.cpu_depthwise(qenc, engine)
            qenc.direct = direct.applies(engine)
    qenc.activation_bits = bits
    return qenc.requires_grad_(False)


def attention_matmuls(qenc: nn.Module) -> str | None:
    """What an int8 encoder's attention matmuls run in, as reports name it (`bfloat16`, `float32`); None
    for a family without attention (the conv family)."""
    dtype = getattr(qenc, "attention_dtype", None)
    return None if dtype is None else str(dtype).removeprefix("torch.")


def rebuild(qenc: nn.Module, engine: str, bits: int) -> nn.Module:
    """`qenc` (calibrated at 8 bits, packed for `engine`) as it runs with `bits`-bit activations."""
    if bits == 8:
        return qenc
    return load_int8(qenc.spec, qenc.state_dict(), engine, sorted(qenc.float_units), bits)


def with_activation_bits(state_dict: dict, bits: int, keep: Iterable[str] = ()) -> dict:
    """The state dict with every activation scale / zero point (`X.scale` beside `X.zero_point`,
    `in_scale` beside `in_zero_point`) moved from the calibrated 8-bit grid to a `bits`-bit grid
    over the same range: [-zp * s, (255 - zp) * s] stays, with 2^bits - 1 steps. Weights (qint8,
    per-channel, packed in their own keys) are untouched. No re-calibration: the ranges are the
    calibrated ones. Scale keys in `keep` (outputs that no u8 x s8 product reads: the logits, each
    int8 Linear's output, what only a quantized add reads) keep their 8 bits."""
    if bits == 8:
        return state_dict
    levels, keep = 2**bits - 1, set(keep)
    out = state_dict.copy()
    if hasattr(state_dict, "_metadata"):  # module versions: quantized Linear reads its keys by them
        out._metadata = state_dict._metadata
    for key, scale in state_dict.items():
        if not key.endswith("scale") or key in keep:
            continue
        zp_key = key[: -len("scale")] + "zero_point"
        zero_point = state_dict.get(zp_key)
        if (
            not (isinstance(scale, torch.Tensor) and isinstance(zero_point, torch.Tensor))
            or scale.is_quantized
            or not scale.is_floating_point()
            or zero_point.is_floating_point()
        ):
            continue
        out[key] = scale * (255 / levels)
        out[zp_key] = torch.round(zero_point.double() * levels / 255).clamp(0, levels).to(zero_point.dtype)
    return out


class Int8Model(ReadsLogits):
    """fp32 features + int8 encoder/decoder, with the lean model's interface (`spec`, forward)."""

    def __init__(self, spec: ModelSpec, features: nn.Module, qencoder: nn.Module, engine: str):
        super().__init__()
        self.spec = spec
        self.features = features
        self.qencoder = qencoder
        self.engine = engine
        self.reader = int8_reader(qencoder, engine)
        self.head = self.reader.head

    def logits(self, feats: torch.Tensor, frames: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Decoder output [B, C, T'] before log-softmax (what the accuracy gate compares), and lengths."""
        with quiet(), engine_scope(self.engine):
            return self.qencoder(feats, frames)


def int8_reader(qenc: nn.Module, engine: str) -> LogitReader:
    """How an int8 model built from `qenc` on `engine` reads its logits (a transducer: with its int8 LSTM)."""
    head = getattr(qenc, "head", None)
    return LogitReader(qenc.spec, None if head is None else int8_prediction_network(head, engine))


def int8_prediction_network(head: nn.Module, engine: str) -> nn.Module:
    """A copy of a transducer head whose LSTM is dynamic int8 (int8 weights, activations quantized per step
    with 7-bit range on x86), packed for `engine`; the embedding and the joint stay fp32.

    Chosen by measurement. Parakeet-TDT-0.6B's prediction network (2 x 640-unit LSTM) reads 26 MB of fp32
    weights per step, memory-bound: 2.1 ms per step at batch 1, 3.8 ms at batch 8 (2 threads, AMD EPYC
    AVX2), against 0.43 / 0.70 ms in int8. On the tests' trained RNN-T and TDT, int8 vs fp32 transcripts
    differ by 0.0% / 0.23% WER on 60 utterances (onednn, fbgemm). The joint's Linear layers in int8 gave
    nothing at batch 1 (91 vs 95 us a step) and are left fp32. Built the same way on the driver (gate,
    self-check reference) and on every worker, from the fp32 head in the artifact: no calibration."""
    import copy

    with quiet(), engine_scope(engine):
        return torch.ao.quantization.quantize_dynamic(copy.deepcopy(head), {nn.LSTM}, dtype=torch.qint8)
