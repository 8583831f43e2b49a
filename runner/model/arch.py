"""A plain, serializable description of a NeMo CTC model: what the lean model is built from.

The description is JSON-safe (it is stored in artifacts and `job.json`) and carries no
weights. `runner.model.nemo_loader` produces it from a `.nemo` file; `runner.model.ctc` builds a
torch-only model from it.
"""

from __future__ import annotations

import base64
import dataclasses
from dataclasses import dataclass, field
from typing import Any

ACTIVATIONS = ("relu", "hardtanh", "selu", "swish", "silu", "gelu", "identity")
NORMALIZE_TYPES = ("per_feature", "all_features", None)


@dataclass(frozen=True)
class FeatureConfig:
    """Log-mel front end, the parameters of NeMo's `AudioToMelSpectrogramPreprocessor`."""

    sample_rate: int = 16000
    win_length: int = 320  # samples (NeMo: window_size * sample_rate)
    hop_length: int = 160
    n_fft: int = 512
    window: str = "hann"  # hann | hamming | blackman | bartlett | none
    preemph: float | None = 0.97
    n_mels: int = 64
    lowfreq: float = 0.0
    highfreq: float | None = None
    log: bool = True
    log_zero_guard_type: str = "add"  # add | clamp
    log_zero_guard_value: float | str = 2**-24  # a number, "tiny" or "eps"
    mag_power: float = 2.0
    normalize: str | None = "per_feature"
    exact_pad: bool = False
    pad_value: float = 0.0
    mel_norm: str | None = "slaney"


@dataclass(frozen=True)
class BlockSpec:
    """One Jasper/QuartzNet block: `repeat` conv sub-blocks plus an optional residual."""

    filters: int
    repeat: int
    kernel: int  # after NeMo's kernel_size_factor rounding (always odd)
    stride: int = 1
    dilation: int = 1
    separable: bool = False
    residual: bool = False
    residual_mode: str = "add"  # add | stride_add
    residual_dense: bool = False
    stride_last: bool = False
    future_context: int = -1  # -1: symmetric "same" padding
    se: bool = False  # squeeze-excite after the last conv+BN (Citrinet)
    se_reduction_ratio: int = 8  # hidden width of the SE's two linear layers = filters // ratio
    # NeMo's se_context_size: recorded only; in eval mode NeMo 3.0 averages over every valid frame anyway
    se_context_window: int = -1


@dataclass(frozen=True)
class EncoderSpec:
    """NeMo `ConvASREncoder` (QuartzNet and Jasper families)."""

    feat_in: int
    activation: str
    blocks: tuple[BlockSpec, ...]
    conv_mask: bool = True

    @property
    def subsampling(self) -> int:
        factor = 1
        for block in self.blocks:
            factor *= block.stride
        return factor


@dataclass(frozen=True)
class TokenizerSpec:
    """A subword tokenizer shipped inside the spec: workers never see the .nemo file it came from."""

    kind: str  # "sentencepiece" (NeMo's SentencePieceTokenizer, `tokenizer.type: bpe`)
    model_b64: str  # the serialized SentencePiece model proto (`tokenizer.model`), base64

    def model_bytes(self) -> bytes:
        return base64.b64decode(self.model_b64)

    @classmethod
    def sentencepiece(cls, model_proto: bytes) -> TokenizerSpec:
        return cls("sentencepiece", base64.b64encode(model_proto).decode("ascii"))


@dataclass(frozen=True)
class ConformerSpec:
    """NeMo `ConformerEncoder` (Conformer and FastConformer) in its full-context, rel_pos form.

    The lean encoder lives in `runner.model.conformer`; `runner.model.nemo_loader` rejects every option
    that would change its arithmetic (limited context, layer-norm conv, reduction, ...).
    """

    feat_in: int
    n_layers: int
    d_model: int
    n_heads: int
    ff_expansion_factor: int = 4
    subsampling_mode: str = "striding"  # striding (Conformer) | dw_striding (FastConformer)
    subsampling_factor: int = 4  # 4 or 8 (a power of 2)
    subsampling_conv_channels: int = -1  # -1: d_model
    conv_kernel_size: int = 31
    xscaling: bool = True
    use_bias: bool = True
    feat_out: int = -1  # > 0 and != d_model: a final Linear (`out_proj`)

    @property
    def subsampling(self) -> int:
        return self.subsampling_factor

    @property
    def out_channels(self) -> int:
        return self.feat_out if self.feat_out > 0 else self.d_model


ENCODER_SPECS = {"conv-ctc": EncoderSpec, "conformer-ctc": ConformerSpec}  # by ModelSpec.family
TRANSDUCER_KINDS = ("rnnt", "tdt")
JOINT_ACTIVATIONS = ("relu", "sigmoid", "tanh")


@dataclass(frozen=True)
class TransducerSpec:
    """The transducer head of NeMo's `EncDecRNNT(BPE)Model` (RNN-T or TDT loss) or of a hybrid model's
    transducer decoder: `RNNTDecoder` (embedding + LSTM, blank as padding) and `RNNTJoint`, decoded
    greedily as NeMo's label-looping `greedy_batch` does (`runner.model.transducer`)."""

    kind: str  # rnnt | tdt
    pred_hidden: int  # embedding width and the LSTM's output width
    pred_rnn_layers: int = 1
    rnn_hidden: int = -1  # the LSTM's hidden size when it projects to pred_hidden; -1: pred_hidden
    joint_hidden: int = 640
    activation: str = "relu"  # the joint's: relu | sigmoid | tanh
    durations: tuple[int, ...] = ()  # TDT: the frame advance of each duration output
    max_symbols: int | None = 10  # emissions per frame before the decoder moves on (None: no limit)

    @property
    def lstm_hidden(self) -> int:
        return self.rnn_hidden if self.rnn_hidden > 0 else self.pred_hidden


@dataclass(frozen=True)
class ModelSpec:
    """Everything needed to rebuild a CTC or transducer model without NeMo, except its weights."""

    features: FeatureConfig
    encoder: EncoderSpec | ConformerSpec  # which one: `family`
    vocabulary: tuple[str, ...]  # characters, or the tokenizer's pieces (id order)
    family: str = "conv-ctc"
    source: dict = field(default_factory=dict)  # NeMo class names, for messages and reports
    tokenizer: TokenizerSpec | None = None  # None: character vocabulary, tokens joined as they are
    transducer: TransducerSpec | None = None  # None: a CTC model (ConvASRDecoder)

    @property
    def head(self) -> str:
        """What turns encoder frames into tokens: ctc, rnnt or tdt."""
        return "ctc" if self.transducer is None else self.transducer.kind

    @property
    def num_classes(self) -> int:
        """Output classes including the CTC blank, which NeMo puts last."""
        return len(self.vocabulary) + 1

    @property
    def blank_id(self) -> int:
        return len(self.vocabulary)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ModelSpec:
        family = data.get("family", "conv-ctc")
        if family not in ENCODER_SPECS:
            raise ValueError(f"unknown model family {family!r} (known: {', '.join(ENCODER_SPECS)})")
        enc = dict(data["encoder"])
        if family == "conv-ctc":
            enc["blocks"] = tuple(BlockSpec(**b) for b in enc["blocks"])
        return cls(
            features=FeatureConfig(**data["features"]),
            encoder=ENCODER_SPECS[family](**enc),
            vocabulary=tuple(data["vocabulary"]),
            family=family,
            source=dict(data.get("source", {})),
            tokenizer=TokenizerSpec(**data["tokenizer"]) if data.get("tokenizer") else None,
            transducer=_transducer(data.get("transducer")),
        )


def _transducer(data: dict | None) -> TransducerSpec | None:
    if not data:
        return None
    return TransducerSpec(**{**data, "durations": tuple(data.get("durations", ()))})


def same_padding(block: BlockSpec) -> tuple[int, int]:
    """(left, right) zero padding of a block's main convolutions, as NeMo's JasperBlock computes it."""
    k, d, fc = block.kernel, block.dilation, block.future_context
    sym = (d * (k - 1)) // 2
    if fc < 0 or k <= fc:
        return sym, sym
    if d > 1:
        return d * k - 1 - d * fc, d * fc
    return k - 1 - fc, fc
