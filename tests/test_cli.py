"""The CLI and the loader's checks: real .nemo files, unsupported models, exit codes."""

import json
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
import yaml

from runner.cli.main import main
from runner.errors import UnsupportedModelError
from runner.model.nemo_config import _block
from runner.model.nemo_loader import check_supported, read_nemo_config


def fake_nemo(path: Path, config: dict) -> Path:
    """A .nemo-shaped archive holding only a model_config.yaml."""
    cfg = path.with_suffix(".yaml")
    cfg.write_text(yaml.safe_dump(config))
    with tarfile.open(path, "w:") as tar:
        tar.add(cfg, arcname="./model_config.yaml")
    return path


CANARY = {  # an attention encoder-decoder (Canary): neither CTC nor a transducer
    "target": "nemo.collections.asr.models.aed_multitask_models.EncDecMultiTaskModel",
    "preprocessor": {"_target_": "nemo.collections.asr.modules.AudioToMelSpectrogramPreprocessor"},
    "encoder": {"_target_": "nemo.collections.asr.modules.ConformerEncoder"},
    "decoder": {"_target_": "nemo.collections.asr.modules.transformer.get_nemo_transformer"},
}


def test_unsupported_model_names_its_classes_and_exits_2(tmp_path, capsys):
    model = fake_nemo(tmp_path / "canary.nemo", CANARY)
    with pytest.raises(
        UnsupportedModelError,
        match="model=EncDecMultiTaskModel.*decoder=get_nemo_transformer.*supported: EncDecCTCModel.*EncDecRNNTModel",
    ):
        check_supported(read_nemo_config(model), str(model))
    wav = tmp_path / "x.wav"
    wav.write_bytes(b"")
    assert main(["transcribe", str(model), str(wav)]) == 2
    err = capsys.readouterr().err
    assert "canary.nemo: unsupported model" in err and "EncDecMultiTaskModel" in err


def test_grouped_conv_block_is_refused_by_name():
    with pytest.raises(UnsupportedModelError, match="block 3 uses groups=4, which the lean model does not support"):
        _block(
            3,
            {
                "filters": 256,
                "repeat": 5,
                "kernel": [11],
                "stride": [1],
                "dilation": [1],
                "residual": True,
                "se": True,
                "groups": 4,
            },
            "add",
            "jasper.nemo",
        )


def test_not_a_model_file_exits_2(tmp_path, capsys):
    bogus = tmp_path / "model.nemo"
    bogus.write_text("hello")
    assert main(["transcribe", str(bogus), str(bogus)]) == 2
    assert "model.nemo: neither a .nemo archive nor a lean checkpoint" in capsys.readouterr().err
    assert main(["transcribe", str(tmp_path / "absent.nemo"), str(bogus)]) == 2


def test_main_in_process_leaves_logging_as_it_found_it(tmp_path, capsys):
    """A handler left on a stream the caller closes (pytest's capture, a notebook cell's) turned every
    later log line of the process into a 'Logging error' traceback."""
    import logging

    root, ours = logging.getLogger(), logging.getLogger("runner")
    before = root.handlers[:], root.level, ours.level
    bogus = tmp_path / "model.nemo"
    bogus.write_text("hello")
    assert main(["--verbose", "transcribe", str(bogus), str(bogus)]) == 2
    assert (root.handlers, root.level, ours.level) == before


def test_export_then_transcribe_from_the_installed_console_script(tiny_nemo_file, speech_files, tmp_path):
    from runner.inputs.audio import load_audio
    from runner.model.ctc import load_model
    from runner.model.transcribe import transcribe_batch

    exe = Path(sys.executable).with_name("asr-runner")
    lean = tmp_path / "tiny.pt"
    subprocess.run([str(exe), "--quiet", "export", tiny_nemo_file, "--out", str(lean)], check=True, timeout=300)
    paths = [p for _, p in speech_files[:5]]
    out = subprocess.run(
        [str(exe), "transcribe", "--quiet", str(lean), *paths, str(tmp_path / "gone.wav")],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 1  # one file failed
    assert "gone.wav\tERROR" in out.stderr and "file not found" in out.stderr
    lines = dict(line.split("\t", 1) for line in out.stdout.strip().splitlines())
    expected = transcribe_batch(load_model(lean), [load_audio(p, 16000) for p in paths])
    assert [lines[p] for p in paths] == expected

    # --words: one JSON line per file, the same text, its words with times and confidence
    out = subprocess.run(
        [str(exe), "transcribe", "--quiet", "--words", str(lean), *paths[:2]],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr
    rows = [json.loads(line) for line in out.stdout.strip().splitlines()]
    assert [r["audio_filepath"] for r in rows] == paths[:2] and [r["text"] for r in rows] == expected[:2]
    for r in rows:
        assert [w["word"] for w in r["words"]] == r["text"].split() and 0 <= r["confidence"] <= 1
        assert all(0 <= w["start"] <= w["end"] and 0 <= w["confidence"] <= 1 for w in r["words"])
