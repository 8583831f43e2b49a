"""NeMo transducer configs -> the lean transducer head (`TransducerSpec`) and parameter names.

Supported: `EncDecRNNTModel` / `EncDecRNNTBPEModel` (RNN-T or TDT loss) and the hybrid
`EncDecHybridRNNTCTCModel` / `EncDecHybridRNNTCTCBPEModel`, whose job spec chooses the head
(`decoder: rnnt` for the transducer, `ctc` for the auxiliary CTC decoder). The encoder must be a
`ConformerEncoder` (FastConformer, as every released transducer of NeMo's); the prediction network an
`RNNTDecoder` with an LSTM and blank as padding; the joint an `RNNTJoint`. Greedy decoding follows the
model's `decoding` section: `max_symbols` (NeMo's default 10) and, for TDT, the loss's `durations`.
Reads plain dicts; never imports NeMo or torch.
"""

from __future__ import annotations

import re

from runner.errors import UnsupportedModelError
from runner.model.arch import JOINT_ACTIVATIONS, TransducerSpec

TRANSDUCER_MODELS = ("EncDecRNNTModel", "EncDecRNNTBPEModel")
HYBRID_MODELS = ("EncDecHybridRNNTCTCModel", "EncDecHybridRNNTCTCBPEModel")
BPE_MODELS = ("EncDecCTCModelBPE", "EncDecRNNTBPEModel", "EncDecHybridRNNTCTCBPEModel")
HEADS = ("rnnt", "ctc")  # the job spec's `decoder` for hybrid models; "rnnt" covers TDT too
SUPPORTED_TEXT = (
    "EncDecRNNTModel or EncDecRNNTBPEModel (RNN-T or TDT loss), or the hybrid EncDecHybridRNNTCTCModel / "
    "EncDecHybridRNNTCTCBPEModel (either head), with a ConformerEncoder, RNNTDecoder (LSTM) and RNNTJoint"
)


def is_transducer(model: str) -> bool:
    return model in TRANSDUCER_MODELS or model in HYBRID_MODELS


def chosen_head(model: str, head: str | None, where: str) -> str:
    """The head a job decodes with: `ctc` for CTC models; for transducers `rnnt` (the model's own
    default, NeMo's `cur_decoder`), or `ctc` for a hybrid's auxiliary decoder when the spec asks."""
    if head is not None and head not in HEADS:
        raise UnsupportedModelError(f"{where}: decoder {head!r} is not one of {', '.join(HEADS)}")
    if not is_transducer(model):
        if head == "rnnt":
            raise UnsupportedModelError(f"{where}: {model} has no transducer decoder; remove `decoder: rnnt`")
        return "ctc"
    if head == "ctc" and model not in HYBRID_MODELS:
        raise UnsupportedModelError(f"{where}: {model} has no CTC decoder; `decoder: ctc` needs a hybrid model")
    return head or "rnnt"


def check_transducer(config: dict, where: str) -> None:
    """Raise `UnsupportedModelError` naming what the lean transducer head cannot rebuild."""
    name = lambda key: (config.get(key) or {}).get("_target_", "").rsplit(".", 1)[-1]  # noqa: E731
    found = {"encoder": name("encoder"), "decoder": name("decoder"), "joint": name("joint")}
    wanted = {"encoder": "ConformerEncoder", "decoder": "RNNTDecoder", "joint": "RNNTJoint"}
    bad = [f"{k}={v or '?'}" for k, v in found.items() if v != wanted[k]]
    if bad:
        raise UnsupportedModelError(f"{where}: unsupported transducer ({', '.join(bad)}); supported: {SUPPORTED_TEXT}")
    dcfg, jcfg = config["decoder"], config["joint"]
    prednet = dcfg.get("prednet") or {}
    problems = []
    if not dcfg.get("blank_as_pad", True):
        problems.append("decoder.blank_as_pad=false")
    if prednet.get("norm") not in (None, "none"):
        problems.append(f"decoder.prednet.norm={prednet.get('norm')!r} (layer-normalized LSTM)")
    if str(prednet.get("rnn_type", "lstm")).lower() != "lstm":
        problems.append(f"decoder.prednet.rnn_type={prednet.get('rnn_type')!r}")
    activation = str((jcfg.get("jointnet") or {}).get("activation", "relu")).lower()
    if activation not in JOINT_ACTIVATIONS:
        problems.append(f"joint.jointnet.activation={activation!r}")
    loss = _loss_name(config)
    if loss not in ("default", "warprnnt_numba", "warprnnt", "pytorch", "graph_rnnt", "tdt"):
        problems.append(f"loss.loss_name={loss!r} (multi-blank and other transducer variants)")
    if problems:
        raise UnsupportedModelError(f"{where}: transducer options not supported: {'; '.join(problems)}")


def _loss_name(config: dict) -> str:
    return str((config.get("loss") or {}).get("loss_name", "default"))


def transducer_spec(config: dict, where: str) -> TransducerSpec:
    """The prediction network, joint and greedy decoding settings of a transducer config."""
    dcfg, jcfg = config["decoder"], config["joint"]
    prednet, jointnet = dcfg.get("prednet") or {}, jcfg.get("jointnet") or {}
    tdt = _loss_name(config) == "tdt"
    durations: tuple[int, ...] = ()
    if tdt:
        kwargs = (config.get("loss") or {}).get("tdt_kwargs") or {}
        listed = kwargs.get("durations") or (config.get("model_defaults") or {}).get("tdt_durations") or ()
        durations = tuple(int(d) for d in listed)
        extra = int(jcfg.get("num_extra_outputs", 0) or 0)
        if not durations or extra != len(durations):
            raise UnsupportedModelError(
                f"{where}: TDT model with durations {list(durations)} but {extra} duration outputs in the joint"
            )
    greedy = (config.get("decoding") or {}).get("greedy") or {}
    max_symbols = greedy.get("max_symbols") or greedy.get("max_symbols_per_step", 10)  # NeMo's rule and default
    return TransducerSpec(
        kind="tdt" if tdt else "rnnt",
        pred_hidden=int(prednet["pred_hidden"]),
        pred_rnn_layers=int(prednet.get("pred_rnn_layers", 1)),
        rnn_hidden=int(prednet.get("rnn_hidden_size", -1) or -1),
        joint_hidden=int(jointnet["joint_hidden"]),
        activation=str(jointnet.get("activation", "relu")).lower(),
        durations=durations,
        max_symbols=None if max_symbols is None else int(max_symbols),
    )


_JOINT_OUT = re.compile(r"^joint\.joint_net\.\d+\.")
_RENAMES = (  # NeMo transducer parameter names -> lean names
    (re.compile(r"^decoder\.prediction\.embed\."), "head.embed."),
    (re.compile(r"^decoder\.prediction\.dec_rnn\.lstm\."), "head.lstm."),
    (re.compile(r"^joint\.pred\."), "head.pred."),
    (re.compile(r"^joint\.enc\."), "decoder.linear."),
    (_JOINT_OUT, "head.out."),
)


def rename_head(state: dict, head: str) -> dict:
    """Move a transducer's (or a hybrid's chosen) decoder parameters to the lean names, dropping the
    head not used; encoder and front-end keys are passed through for `lean_state_dict`."""
    out = {}
    for key, value in state.items():
        if key.startswith("ctc_decoder."):
            if head == "ctc":
                out[key[len("ctc_") :]] = value  # decoder.decoder_layers.0.*, as a CTC model's
            continue
        if key.startswith(("decoder.prediction.", "joint.")):
            if head == "ctc":
                continue
            for pattern, repl in _RENAMES:
                if pattern.match(key):
                    out[pattern.sub(repl, key)] = value
                    break
            else:
                out[key] = value  # unexpected: `lean_state_dict` names it
            continue
        out[key] = value
    return out
