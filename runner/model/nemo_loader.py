"""Driver side: `.nemo` file -> (`ModelSpec`, fp32 state dict for the lean model), read from the archive.

`load_nemo` never imports NeMo; the front end comes from the config with NeMo's own defaults. Only
`load_nemo_with_nemo` (the reference), `describe` and `text_decoder` (in-memory NeMo models) use NeMo,
inside functions: `import runner.model.nemo_loader` stays cheap.
"""

from __future__ import annotations

import logging
import posixpath
import re
import tarfile
from pathlib import Path
from typing import Any

import torch

from runner.errors import InputError, UnsupportedModelError
from runner.model.arch import FeatureConfig, ModelSpec, TokenizerSpec
from runner.model.decoding import TextDecoder
from runner.model.nemo_archive import WEIGHTS, NemoArchive
from runner.model.nemo_config import _conformer_encoder, _encoder, _features_from_config, check_conformer_options  # noqa: F401
from runner.model.nemo_transducer import (
    BPE_MODELS,
    HYBRID_MODELS,
    check_transducer,
    chosen_head,
    is_transducer,
    rename_head,
    transducer_spec,
)
from runner.model.nemo_transducer import SUPPORTED_TEXT as TRANSDUCER_TEXT

log = logging.getLogger(__name__)

SUPPORTED = {
    "model": ("EncDecCTCModel", "EncDecCTCModelBPE"),
    "preprocessor": ("AudioToMelSpectrogramPreprocessor",),
    "encoder": ("ConvASREncoder", "ConformerEncoder"),
    "decoder": ("ConvASRDecoder",),
}
SUPPORTED_TEXT = (
    "EncDecCTCModel (character vocabulary) or EncDecCTCModelBPE (SentencePiece `bpe` tokenizer) "
    "with AudioToMelSpectrogramPreprocessor, ConvASREncoder or ConformerEncoder, and ConvASRDecoder "
    "(QuartzNet, Jasper, Citrinet, Conformer-CTC and FastConformer-CTC); or " + TRANSDUCER_TEXT
)
TOKENIZER_TYPES = ("bpe",)  # NeMo's tokenizer.type for SentencePiece; `wpe` (WordPiece) and `agg` are not supported
_LEGACY = (
    "tokenizer SentencePieceTokenizer (legacy, with special tokens) is not supported; only NeMo's "
    "SentencePieceTokenizer (tokenizer.type: bpe, not legacy) can be shipped to the workers"
)


def read_nemo_config(path: str | Path) -> dict[str, Any]:
    """model_config.yaml of a .nemo archive, without NeMo."""
    with NemoArchive(Path(path)) as archive:
        return archive.read_config()


def check_supported(config: dict[str, Any], where: str) -> None:
    """Raise `UnsupportedModelError` naming the classes found unless all are supported."""
    found = {
        "model": config.get("target", ""),
        "preprocessor": (config.get("preprocessor") or {}).get("_target_", ""),
        "encoder": (config.get("encoder") or {}).get("_target_", ""),
        "decoder": (config.get("decoder") or {}).get("_target_", ""),
    }
    names = {k: v.rsplit(".", 1)[-1] for k, v in found.items()}
    if is_transducer(names["model"]) and names["preprocessor"] in SUPPORTED["preprocessor"]:
        check_transducer(config, where)
        _check_tokenizer_config(names["model"], config.get("tokenizer"), where)
        check_conformer_options(config["encoder"], where)
        if names["model"] in HYBRID_MODELS:
            ctc = ((config.get("aux_ctc") or {}).get("decoder") or {}).get("_target_", "").rsplit(".", 1)[-1]
            if ctc != "ConvASRDecoder":
                raise UnsupportedModelError(f"{where}: hybrid model with CTC decoder {ctc or '?'}, not ConvASRDecoder")
        return
    if all(names[k] in SUPPORTED[k] for k in SUPPORTED):
        _check_tokenizer_config(names["model"], config.get("tokenizer"), where)
        if names["encoder"] == "ConformerEncoder":
            check_conformer_options(config["encoder"], where)
        return
    listed = ", ".join(f"{k}={v or '?'}" for k, v in names.items())
    raise UnsupportedModelError(f"{where}: unsupported model ({listed}); supported: {SUPPORTED_TEXT}")


def _check_tokenizer_config(model: str, tokenizer: Any, where: str) -> None:
    if model not in BPE_MODELS:
        return
    tokenizer = tokenizer or {}
    kind = tokenizer.get("type")
    if str(kind).lower() not in TOKENIZER_TYPES or tokenizer.get("custom_tokenizer"):  # NeMo lower()s the type
        found = "custom_tokenizer" if tokenizer.get("custom_tokenizer") else f"tokenizer.type={kind!r}"
        raise UnsupportedModelError(
            f"{where}: {model} with {found} is not supported; only NeMo's "
            "SentencePiece tokenizer (tokenizer.type: bpe) can be shipped to the workers"
        )
    if tokenizer.get("special_tokens") is not None:  # NeMo's ASR mixin builds SentencePieceTokenizer(model_path)
        raise UnsupportedModelError(f"{where}: {_LEGACY}")  # alone; special tokens were the legacy form


def load_nemo(path: str | Path, head: str | None = None) -> tuple[ModelSpec, dict[str, torch.Tensor]]:
    """Spec and lean-model weights of a `.nemo` checkpoint, read from the archive (no NeMo import).
    `head`: a hybrid model's decoder to use, `rnnt` (its default) or `ctc`."""
    where = str(path)
    with NemoArchive(Path(path)) as archive:
        config = archive.read_config()
        check_supported(config, where)
        model = config["target"].rsplit(".", 1)[-1]
        head = chosen_head(model, head, where)
        spec = _spec(config, model, head, where, lambda tcfg, lab: _tokenizer_from_archive(tcfg, lab, archive, where))
        weights = archive.open(WEIGHTS, "not a NeMo checkpoint saved by save_to()", seekable=True)
        try:
            state = torch.load(weights, map_location="cpu", weights_only=True)
        except Exception as exc:
            raise InputError(f"{where}: {WEIGHTS} unreadable ({type(exc).__name__}: {exc})") from None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise InputError(f"{where}: {WEIGHTS} is not a state dict of tensors")
    if is_transducer(model):
        state = rename_head(state, head)
    return spec, lean_state_dict(state, where, copy=False)


def _spec(config: dict, model: str, head: str, where: str, read_tokenizer) -> ModelSpec:
    """The lean description of a supported config; `read_tokenizer(tokenizer_cfg, labels)` gives a
    subword model's (TokenizerSpec, pieces)."""
    names = {k: (config.get(k) or {}).get("_target_", "").rsplit(".", 1)[-1] for k in ("encoder", "decoder")}
    conformer = names["encoder"] == "ConformerEncoder"
    transducer = is_transducer(model)
    if transducer:
        labels = (config.get("joint") or {}).get("vocabulary") or config.get("labels")
        if head == "ctc":
            names["decoder"] = "ConvASRDecoder (aux_ctc)"
    else:
        labels = config["decoder"].get("vocabulary")
    if model in BPE_MODELS:
        tokenizer, vocabulary = read_tokenizer(config["tokenizer"], labels)
    else:
        tokenizer, vocabulary = None, labels
        if not vocabulary:
            raise UnsupportedModelError(f"{where}: no vocabulary (labels); a character model needs its labels")
    return ModelSpec(
        features=_features_from_config(config["preprocessor"], where),
        encoder=_conformer_encoder(config["encoder"], where) if conformer else _encoder(config["encoder"], where),
        vocabulary=tuple(vocabulary),
        family="conformer-ctc" if conformer else "conv-ctc",
        source={"model": model, **names, "file": where, **({"head": head} if transducer else {})},
        tokenizer=tokenizer,
        transducer=transducer_spec(config, where) if transducer and head == "rnnt" else None,
    )


def load_nemo_with_nemo(path: str | Path) -> tuple[ModelSpec, dict[str, torch.Tensor]]:
    """The same through NeMo's restore_from (7+ s, 700+ MB): the reference `load_nemo` is tested against."""
    config = read_nemo_config(path)
    check_supported(config, str(path))
    from nemo.collections.asr import models  # heavy: 7+ s, 700+ MB

    quiet_nemo_logging(logging.getLogger("runner").isEnabledFor(logging.DEBUG))  # NeMo resets it on import
    log.info("restoring %s with NeMo", path)
    cls = getattr(models, config.get("target", "").rsplit(".", 1)[-1] or "EncDecCTCModel", models.EncDecCTCModel)
    model = cls.restore_from(str(path), map_location="cpu")
    return describe(model, str(path))


def _tokenizer_from_archive(
    tcfg: dict, labels: Any, archive: NemoArchive, where: str
) -> tuple[TokenizerSpec, tuple[str, ...]]:
    """The SentencePiece model the config names (NeMo's register_artifact: `nemo:<member>`, else the file's
    base name inside the archive; no model_path: <dir>/tokenizer.model) and its pieces in id order."""
    import sentencepiece

    src = tcfg["model_path"] if "model_path" in tcfg else posixpath.join(str(tcfg.get("dir")), "tokenizer.model")
    if not src:
        raise InputError(f"{where}: tokenizer.model_path is empty; the SentencePiece model cannot be found")
    name = src[len("nemo:") :] if src.startswith("nemo:") else posixpath.basename(src)
    data = archive.open(name, f"the tokenizer model named by tokenizer.model_path ({src}) is not in the archive")
    try:
        proc = sentencepiece.SentencePieceProcessor()
        proc.LoadFromSerializedProto(data.read())
    except Exception as exc:
        raise InputError(f"{where}: {name} unreadable: not a SentencePiece model ({exc})") from None
    pieces = tuple(proc.id_to_piece(i) for i in range(proc.get_piece_size()))
    if labels and list(pieces) != list(labels):  # NeMo sets decoder.vocabulary to these pieces when it builds
        raise UnsupportedModelError(
            f"{where}: the decoder's vocabulary ({len(labels)} labels) is not the "
            f"tokenizer's {len(pieces)} pieces in id order; cannot decode its outputs"
        )
    return TokenizerSpec.sentencepiece(proc.serialized_model_proto()), pieces


def describe(model, where: str = "model", head: str | None = None) -> tuple[ModelSpec, dict[str, torch.Tensor]]:
    """Spec and lean-model weights of an in-memory NeMo model (CTC, transducer or hybrid: `head`)."""
    cfg = _to_container(model.cfg)
    name = type(model).__name__
    check_supported({"target": f"x.{name}", **cfg}, where)
    if is_transducer(name):
        head = chosen_head(name, head, where)

        def read_tokenizer(tcfg, labels):
            tok = _tokenizer(model, where, labels)
            return tok, tuple(labels)

        spec = _spec(cfg, name, head, where, read_tokenizer)
        return spec, lean_state_dict(rename_head(model.state_dict(), head), where)
    conformer = type(model.encoder).__name__ == "ConformerEncoder"
    spec = ModelSpec(
        features=_features(model.preprocessor.featurizer, cfg["preprocessor"], where),
        encoder=_conformer_encoder(cfg["encoder"], where) if conformer else _encoder(cfg["encoder"], where),
        vocabulary=tuple(model.decoder.vocabulary),
        family="conformer-ctc" if conformer else "conv-ctc",
        source={
            "model": type(model).__name__,
            "encoder": type(model.encoder).__name__,
            "decoder": type(model.decoder).__name__,
            "file": where,
        },
        tokenizer=_tokenizer(model, where),
    )
    return spec, lean_state_dict(model.state_dict(), where)


def _tokenizer(model, where: str, labels=None) -> TokenizerSpec | None:
    """The SentencePiece model of a subword model, as bytes in the spec; None for character models."""
    tokenizer = getattr(model, "tokenizer", None)
    if tokenizer is None:
        return None
    from nemo.collections.common.tokenizers import SentencePieceTokenizer

    legacy = getattr(tokenizer, "legacy", False)
    if type(tokenizer) is not SentencePieceTokenizer or legacy:
        kind = type(tokenizer).__name__ + (" (legacy, with special tokens)" if legacy else "")
        raise UnsupportedModelError(
            f"{where}: tokenizer {kind} is not supported; only NeMo's SentencePieceTokenizer "
            "(tokenizer.type: bpe, not legacy) can be shipped to the workers"
        )
    proto = tokenizer.tokenizer.serialized_model_proto()
    pieces = [tokenizer.tokenizer.id_to_piece(i) for i in range(tokenizer.tokenizer.get_piece_size())]
    labels = list(model.decoder.vocabulary if labels is None else labels)
    if pieces != labels:
        raise UnsupportedModelError(
            f"{where}: the decoder's vocabulary ({len(labels)} labels) is "
            f"not the tokenizer's {len(pieces)} pieces in id order; cannot decode its outputs"
        )
    return TokenizerSpec.sentencepiece(proto)


def text_decoder(model) -> TextDecoder:
    """A NeMo CTC model's ids -> text, for code that runs the NeMo model itself (recipes, tests)."""
    tok = _tokenizer(model, type(model).__name__)
    return TextDecoder(model.decoder.vocabulary, tok.model_bytes() if tok else None)


def _to_container(cfg) -> dict:
    from omegaconf import OmegaConf

    return OmegaConf.to_container(cfg, resolve=True)


def _features(fe, pcfg: dict, where: str) -> FeatureConfig:
    if getattr(fe, "frame_splicing", 1) != 1:
        raise UnsupportedModelError(f"{where}: preprocessor frame_splicing={fe.frame_splicing} is not supported")
    window = pcfg.get("window", "hann")
    return FeatureConfig(
        sample_rate=int(fe.sample_rate),
        win_length=int(fe.win_length),
        hop_length=int(fe.hop_length),
        n_fft=int(fe.n_fft),
        window=window,
        preemph=fe.preemph,
        n_mels=int(fe.nfilt),
        lowfreq=float(pcfg.get("lowfreq", 0) or 0),
        highfreq=pcfg.get("highfreq"),
        log=bool(fe.log),
        log_zero_guard_type=fe.log_zero_guard_type,
        log_zero_guard_value=fe.log_zero_guard_value,
        mag_power=float(fe.mag_power),
        normalize=fe.normalize or None,
        exact_pad=bool(fe.exact_pad),
        pad_value=float(fe.pad_value),
        mel_norm=pcfg.get("mel_norm", "slaney"),
    )


_RENAMES = (
    (re.compile(r"^preprocessor\.featurizer\."), "features."),
    (re.compile(r"^encoder\.encoder\."), "encoder.blocks."),
    (re.compile(r"^encoder\.(pre_encode|layers|out_proj)\."), r"encoder.\1."),  # Conformer: same names
    (re.compile(r"^decoder\.decoder_layers\.0\."), "decoder."),
    (re.compile(r"^(head|decoder\.linear)\."), r"\1."),  # a transducer's, renamed by `rename_head`
)


def lean_state_dict(nemo_state: dict[str, torch.Tensor], where: str, copy: bool = True) -> dict[str, torch.Tensor]:
    """NeMo parameter names -> lean-model names (the same layout below the prefix); copy=False: fresh tensors."""
    out = {}
    for key, value in nemo_state.items():
        for pattern, repl in _RENAMES:
            if pattern.match(key):
                value = value.detach().clone() if copy else value.detach()
                out[pattern.sub(repl, key)] = value.float() if value.is_floating_point() else value
                break
        else:
            raise UnsupportedModelError(f"{where}: unexpected parameter {key!r} (adapters or extra modules?)")
    return out


def check_model_file(path: str | Path) -> str | None:
    """Cheap checks before any work: the file exists, and a .nemo holds a supported model. Returns
    the `.nemo` model's class name (None for a lean checkpoint)."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: model file not found; set `model` in the job spec")
    if tarfile.is_tarfile(path):
        config = read_nemo_config(path)
        check_supported(config, str(path))
        return str(config.get("target", "")).rsplit(".", 1)[-1]
    return None


def load_any(path: str | Path, head: str | None = None):
    """Lean fp32 model from a `.nemo` file or a lean checkpoint (neither imports NeMo); `head`: a hybrid
    model's decoder (`load_nemo`)."""
    from runner.model.ctc import build_model, load_checkpoint

    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: model file not found")
    if tarfile.is_tarfile(path):
        return build_model(*load_nemo(path, head))
    try:
        return build_model(*load_checkpoint(path))
    except Exception as exc:
        raise InputError(f"{path}: neither a .nemo archive nor a lean checkpoint ({exc})") from None


def quiet_nemo_logging(verbose: bool = False) -> None:
    """NeMo logs through its own logger at INFO; keep its chatter out of user output."""
    import os

    os.environ.setdefault("NEMO_TESTING", "0")
    level = logging.DEBUG if verbose else logging.ERROR
    for name in ("nemo_logger", "nemo", "lightning", "pytorch_lightning", "nv_one_logger"):
        logging.getLogger(name).setLevel(level)
