"""Workers stay lean: `import runner` and the lean model never import NeMo (or Ray)."""

import json
import subprocess
import sys

from runner.model.ctc import save_checkpoint
from runner.model.nemo_loader import describe

PROBE = r"""
import json, sys
{code}
heavy = {{"nemo", "ray", "lightning", "pytorch_lightning", "librosa"}}
heavy = sorted({{m.split(".")[0] for m in sys.modules}} & heavy)
print(json.dumps(heavy))
"""


def imported_heavy(code: str, *args: str) -> list[str]:
    out = subprocess.run(
        [sys.executable, "-c", PROBE.format(code=code), *args], capture_output=True, text=True, check=True, timeout=300
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_import_runner_does_not_import_nemo():
    assert imported_heavy("import runner, runner.errors, runner.model.arch") == []


def test_loading_and_running_the_lean_model_does_not_import_nemo(tiny_nemo, speech_files, tmp_path):
    ckpt = tmp_path / "tiny.pt"
    save_checkpoint(*describe(tiny_nemo), ckpt)
    code = (
        "from runner.model.ctc import load_model\n"
        "from runner.inputs.audio import load_audio\n"
        "from runner.model.transcribe import transcribe_batch\n"
        "import runner.model.nemo_loader, runner.cli.main\n"  # importing the loader module itself is cheap too
        "m = load_model(sys.argv[1])\n"
        "texts = transcribe_batch(m, [load_audio(sys.argv[2], 16000)])\n"
        "assert texts[0], texts\n"
    )
    assert imported_heavy(code, str(ckpt), speech_files[0][1]) == []
