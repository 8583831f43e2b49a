"""`load_nemo` reads a .nemo archive without NeMo and gets exactly what NeMo's restore_from gives.

Real NeMo models saved by save_to(): the bundled demo QuartzNet, a Citrinet with a SentencePiece
tokenizer, a FastConformer whose preprocessor config names nothing (NeMo's defaults everywhere),
a QuartzNet with every front-end option away from its default, and the demo repacked as an older
NeMo would have written it (gzip, Hydra 0.x `cls`/`params`, a `model:` root, an interpolation).
"""

import io
import json
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
import torch
import yaml

from runner.errors import InputError, UnsupportedModelError
from runner.model.nemo_loader import load_nemo, load_nemo_with_nemo
from runner.training.corpus import sentences

from .support import TRAIN_SEED, TRAIN_SENTENCES

DEMO = str(Path(__file__).parent.parent / "runner" / "data" / "demo_quartznet.nemo")
MEL = "nemo.collections.asr.modules.AudioToMelSpectrogramPreprocessor"
# Every AudioToMelSpectrogramPreprocessor option that reaches FeatureConfig, away from its default:
# samples instead of seconds, no n_fft (NeMo: next power of 2 of the window), string guard value.
EXPLICIT_FEATURES = dict(
    _target_=MEL,
    sample_rate=22050,
    window_size=None,
    window_stride=None,
    n_window_size=551,
    n_window_stride=220,
    window="hamming",
    normalize="all_features",
    preemph=None,
    features=40,
    lowfreq=20,
    highfreq=7000,
    log=True,
    log_zero_guard_type="clamp",
    log_zero_guard_value="eps",
    dither=0.0,
    pad_to=0,
    frame_splicing=1,
    exact_pad=True,
    pad_value=-11.5,
    mag_power=1.0,
    mel_norm=None,
)


def repack(src: str, dst: Path, edit=None, drop: tuple[str, ...] = (), gz: bool = False) -> str:
    """A copy of a .nemo archive with its model_config.yaml edited (`edit(config) -> config`) or members dropped."""
    with tarfile.open(src, "r:*") as tar, tarfile.open(dst, "w:gz" if gz else "w:") as out:
        for member in tar.getmembers():
            if any(member.name.endswith(d) for d in drop):
                continue
            data = tar.extractfile(member).read() if member.isfile() else None
            if member.name.endswith("model_config.yaml") and edit is not None:
                data = yaml.safe_dump(edit(yaml.safe_load(data)), sort_keys=False).encode()
                member.size = len(data)
            out.addfile(member, io.BytesIO(data) if data is not None else None)
    return str(dst)


def as_older_nemo(config: dict) -> dict:
    """Hydra 0.x form (`cls` + `params`), the model under a `model:` key, an interpolation."""
    pre = dict(config["preprocessor"])
    pre["sample_rate"] = "${model.sample_rate}"
    config["preprocessor"] = {"cls": pre.pop("_target_"), "params": pre}
    return {"model": config}


@pytest.fixture(scope="module")
def nemo_files(tmp_path_factory) -> dict[str, str]:
    from runner.training.recipes import (
        build_nemo_model,
        conformer_ctc_config,
        randomize_batchnorm,
        small_citrinet_config,
        tiny_quartznet_config,
        train_tokenizer,
    )

    folder = tmp_path_factory.mktemp("direct")
    spm = train_tokenizer(sentences(TRAIN_SENTENCES, TRAIN_SEED), folder / "spm", vocab_size=128)
    conformer = conformer_ctc_config(64, 2, 4, "dw_striding", 4, conv_channels=32, kernel=15, features=64)
    conformer["preprocessor"] = {"_target_": MEL}  # NeMo's defaults for everything
    explicit = tiny_quartznet_config()
    explicit["preprocessor"], explicit["encoder"]["feat_in"] = EXPLICIT_FEATURES, 40
    files = {"demo": DEMO}
    for name, config in (
        ("citrinet", small_citrinet_config(spm)),
        ("fastconformer_defaults", conformer),
        ("quartznet_explicit_features", explicit),
    ):
        torch.manual_seed(0)
        model = build_nemo_model(config)
        randomize_batchnorm(model)
        files[name] = str(folder / f"{name}.nemo")
        model.save_to(files[name])
    files["demo_as_older_nemo_gz"] = repack(DEMO, folder / "older.nemo", as_older_nemo, gz=True)
    return files


@pytest.mark.parametrize(
    "name", ["demo", "citrinet", "fastconformer_defaults", "quartznet_explicit_features", "demo_as_older_nemo_gz"]
)
def test_direct_load_equals_nemo_restore(nemo_files, name):
    spec, state = load_nemo(nemo_files[name])
    ref_spec, ref_state = load_nemo_with_nemo(nemo_files[name])
    assert spec.features == ref_spec.features
    assert spec == ref_spec
    assert list(state) == list(ref_state)
    for key, value in ref_state.items():
        assert state[key].dtype == value.dtype and torch.equal(state[key], value), key
    if name == "citrinet":
        assert spec.tokenizer is not None and spec.source["model"] == "EncDecCTCModelBPE"
    if name == "quartznet_explicit_features":  # the derivations, not only agreement
        f = spec.features
        assert (f.win_length, f.hop_length, f.n_fft, f.log_zero_guard_value) == (551, 220, 1024, "eps")


def test_direct_load_does_not_import_nemo(nemo_files):
    code = (
        "import json, sys\nfrom runner.model.nemo_loader import load_any\n"
        "for path in sys.argv[1:]:\n    load_any(path)\n"
        "print(json.dumps(sorted({m.split('.')[0] for m in sys.modules} & {'nemo', 'lightning', 'librosa'})))\n"
    )
    paths = [nemo_files[k] for k in ("demo", "citrinet", "fastconformer_defaults", "demo_as_older_nemo_gz")]
    out = subprocess.run([sys.executable, "-c", code, *paths], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout.strip().splitlines()[-1]) == []


def test_archive_without_weights_is_a_clear_error(tmp_path):
    path = repack(DEMO, tmp_path / "config_only.nemo", drop=("model_weights.ckpt",))
    with pytest.raises(
        InputError,
        match=r"config_only\.nemo: model_weights\.ckpt missing: not a NeMo checkpoint "
        r"saved by save_to\(\)",
    ):
        load_nemo(path)


def _vocabulary_reversed(config: dict) -> dict:
    config["decoder"]["vocabulary"] = config["decoder"]["vocabulary"][::-1]
    return config


def _special_tokens(config: dict) -> dict:
    config["tokenizer"]["special_tokens"] = ["<s>", "</s>"]
    return config


@pytest.mark.parametrize(
    "edit,drop,error,message",
    [
        (
            None,
            ("_tokenizer.model",),
            InputError,
            r"_tokenizer\.model missing: the tokenizer model named by "
            r"tokenizer\.model_path \(nemo:.*\) is not in the archive",
        ),
        (
            _vocabulary_reversed,
            (),
            UnsupportedModelError,
            r"the decoder's vocabulary \(128 labels\) is not the "
            r"tokenizer's 128 pieces in id order",
        ),
        (
            _special_tokens,
            (),
            UnsupportedModelError,
            r"SentencePieceTokenizer \(legacy, with special tokens\) is not "
            r"supported",
        ),
    ],
    ids=["tokenizer_missing", "vocabulary_mismatch", "special_tokens"],
)
def test_subword_archive_problems_are_named(nemo_files, tmp_path, edit, drop, error, message):
    path = repack(nemo_files["citrinet"], tmp_path / "bad.nemo", edit, drop)
    with pytest.raises(error, match=message):
        load_nemo(path)
