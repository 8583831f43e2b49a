"""Plain helpers shared by the test modules: no tests and no fixtures here (fixtures live in conftest.py).

Test modules import from here (`from .support import ...`), never from one another or from conftest.
The bad-audio matrix stays in tests/badaudio.py (the README points to it).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import pyarrow.parquet as pq
import torch

from runner.training.corpus import sentences, synthesize_many

ROOT = Path(__file__).resolve().parents[1]

RATE = 16000
TRAIN_SEED, TEST_SEED = 1, 2
TRAIN_SENTENCES = 400


# --- models ----------------------------------------------------------------------------------------


def pad(audios):
    from runner.model.transcribe import pad_batch

    return pad_batch(audios)


def max_logit_diff(nemo_model, lean, audios) -> float:
    """The largest |logit| difference between a NeMo model (in eval mode) and its lean copy on `audios`."""
    assert not any(m.training for m in nemo_model.modules())
    batch, lengths = pad(audios)
    with torch.no_grad():
        ref, ref_len, _ = nemo_model(input_signal=batch, input_signal_length=lengths)
    got, got_len = lean(batch, lengths)
    assert torch.equal(ref_len, got_len)
    return max((ref[i, :n] - got[i, :n]).abs().max().item() for i, n in enumerate(got_len.tolist()))


def copy_model(model):
    """A lean model with its own copy of `model`'s weights (edit it without touching the original)."""
    from runner.model.ctc import build_model

    return build_model(model.spec, {k: v.clone() for k, v in model.state_dict().items()})


HEAVY = {"nemo", "lightning", "pytorch_lightning", "ray"}  # what rebuilding an int8 model must not import


def fresh_process_transcripts(artifact, wavs: list, engine: str, tmp_path: Path) -> tuple[dict, str]:
    """`wavs` transcribed by `artifact`, saved to a file and rebuilt on `engine` in a fresh Python process:
    {'texts', 'engine' (the one it chose), 'modules' (the top-level modules it imported)}, and its stderr."""
    from runner.int8.artifact import save

    path = tmp_path / "model.int8"
    save(artifact.to_bytes(), path)
    code = (
        "import json, sys\n"
        "from runner.int8.artifact import build_int8_model, read\n"
        "from runner.inputs.audio import load_audio\n"
        "from runner.model.transcribe import transcribe_batch\n"
        f"m = build_int8_model(read({str(path)!r}), {engine!r})\n"
        f"texts = transcribe_batch(m.model, [load_audio(p, 16000) for p in {[str(w) for w in wavs]!r}])\n"
        "mods = sorted({n.split('.')[0] for n in sys.modules})\n"
        "print(json.dumps({'texts': texts, 'engine': m.engine, 'modules': mods}))\n"
    )
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    return json.loads(run.stdout.strip().splitlines()[-1]), run.stderr


def valid_frames(logits: torch.Tensor, lens: torch.Tensor) -> torch.Tensor:
    """Logits [B, classes, T] -> [frames, classes]: each item's frames within its length."""
    return logits.transpose(1, 2)[torch.arange(logits.shape[-1]) < lens.unsqueeze(1)]


def direct_vs_modules(built, audios, fp32=None) -> dict:
    """The conv family's int8 forward on uint8 tensors (`runner.int8.direct`) against the quantized modules it
    stands in for, on one padded batch of `audios` (masking included): lengths equal, and over the valid
    frames the logits' cosine (mean, and the worst frame's), argmax agreement and largest difference in the
    decoder's output steps; with the `fp32` lean model, each one's mean cosine to its logits."""
    from runner.int8 import direct

    qenc = built.model.qencoder
    assert qenc.direct and direct.plan_for(qenc) is not None
    feats, frames = built.model.features(*pad(audios))
    with torch.inference_mode():
        ours, lens = built.model.logits(feats, frames)
        qenc.direct = False
        try:
            theirs, their_lens = built.model.logits(feats, frames)
        finally:
            qenc.direct = True
    assert torch.equal(lens, their_lens)
    a, b = valid_frames(ours, lens), valid_frames(theirs, lens)
    cosine = torch.nn.functional.cosine_similarity(a, b, dim=1)
    to_fp32 = {}
    if fp32 is not None:
        with torch.inference_mode():
            ref = valid_frames(fp32.logits(feats, frames)[0], lens)
        for name, x in (("direct_vs_fp32", a), ("modules_vs_fp32", b)):
            to_fp32[name] = float(torch.nn.functional.cosine_similarity(x, ref, dim=1).mean())
    return to_fp32 | {
        "cosine": float(cosine.mean()),
        "worst_frame_cosine": float(cosine.min()),
        "argmax": float((a.argmax(1) == b.argmax(1)).float().mean()),
        "steps": float((a - b).abs().max() / qenc.decoder.scale),
    }


def pinned_engine() -> str:
    """One int8 engine, not `auto`: a timing probe must not decide which int8 arithmetic a test sees."""
    from runner.int8.engines import available_engines

    return "onednn" if "onednn" in available_engines() else "auto"


# --- int8 calibration and gate audio ---------------------------------------------------------------


def calibration_audio(count: int) -> list:
    """`count` utterances of calibration audio (seed 9): sentences apart from training and `speech`."""
    return [a for _t, _v, a in synthesize_many(sentences(count, seed=9), seed=9)]


def held_out_gate(count: int) -> list[tuple[str, object]]:
    """`count` held-out (text, audio) for the int8 gate (seed 3): neither training, calibration nor the
    `speech` test set. The first `count` of a fixed pool: held_out_gate(24) is a prefix of held_out_gate(60)."""
    train = set(sentences(TRAIN_SENTENCES, TRAIN_SEED)) | set(sentences(80, TEST_SEED))
    texts = [t for t in sentences(400, seed=3) if t not in train][:count]
    return [(t, a) for t, _v, a in synthesize_many(texts, seed=3)]


# --- job specs and manifests -----------------------------------------------------------------------


def write_spec(path: Path, **keys) -> Path:
    """A job spec at `path`: fp32, 2 workers, no failed item allowed, unless `keys` say otherwise.
    Path values are written quoted; anything else as it is (a YAML flow mapping for `quantization`)."""
    keys = {"precision": "fp32", "workers": 2, "max_failed": 0, **keys}
    path.write_text("".join(f"{k}: {json.dumps(str(v)) if isinstance(v, Path) else v}\n" for k, v in keys.items()))
    return path


def write_manifest(path: Path, rows: list, newline: str = "\n", bom: bool = False) -> Path:
    """A JSON-lines manifest: a dict row is written as JSON, a string row as it is (a malformed line, a
    blank one); each followed by `newline`, the whole after a UTF-8 BOM if `bom`."""
    text = "".join((r if isinstance(r, str) else json.dumps(r, ensure_ascii=False)) + newline for r in rows)
    path.write_bytes(("\ufeff" if bom else "").encode() + text.encode())
    return path


def manifest_ids(manifest: Path) -> list[str]:
    from runner.inputs.manifest import iter_manifest

    return [item.id for item in iter_manifest(manifest)]


def demo_rows(repeats: int) -> list[dict]:
    """The bundled demo test set (125 utterances), `repeats` times under distinct ids."""
    base = [json.loads(line) for line in (ROOT / "manifests/demo/test.jsonl").read_text().splitlines()]
    return [
        {**r, "id": f"r{k}-{n:03d}", "audio_filepath": str(ROOT / "manifests/demo" / r["audio_filepath"])}
        for k in range(repeats)
        for n, r in enumerate(base)
    ]


# --- run folders and drivers -----------------------------------------------------------------------


def stamps(out: Path, pattern: str = "part-*.parquet") -> dict[str, tuple[int, int]]:
    """name -> (inode, mtime) of the run's transcript files: a rewritten part gets a new stamp."""
    return {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in (out / "transcripts").glob(pattern)}


def kill_a_worker_after_first_shard(killed: list[int]):
    """A job's `on_event` that SIGKILLs one ShardWorker process when the first shard (part or segment) is in,
    and records its pid in `killed`."""
    import psutil

    def on_event(kind, **data):
        if kind == "shard" and not killed:
            for proc in psutil.process_iter(["cmdline"]):
                if any("ShardWorker" in part for part in (proc.info["cmdline"] or [])):
                    proc.kill()
                    killed.append(proc.pid)
                    break

    return on_event


@contextmanager
def running_driver(spec: Path, ready, what: str):
    """`asr-runner run SPEC` in its own process, yielded once `ready()` holds (it must still be running
    then), SIGKILLed on the way out with the Ray processes it started."""
    driver = subprocess.Popen(
        [sys.executable, "-m", "runner.cli", "--quiet", "run", str(spec)],
        start_new_session=True,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        deadline = time.monotonic() + 300
        while driver.poll() is None and time.monotonic() < deadline and not ready():
            time.sleep(0.005)
        assert driver.poll() is None, f"{what} ended before it was killed: {driver.stderr.read().decode()[-2000:]}"
        yield driver
    finally:
        if driver.poll() is None:
            os.kill(driver.pid, signal.SIGKILL)
        driver.wait()
        time.sleep(1)
        try:  # the Ray processes the driver started: gone with it, or cleaned up here
            os.killpg(driver.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


# --- runs -------------------------------------------------------------------------------------------


def check_stage_seconds(out, stats):
    """Each part's worker stages are present, non-negative and within its compute seconds;
    stats.json sums them with the driver's write and the Ray overhead."""
    for path in sorted((out / "transcripts").glob("*.parquet")):
        meta = json.loads(pq.read_schema(path).metadata[b"asr_runner"])
        stages = meta["stages"]
        assert set(stages) == {"read", "resample", "features", "encoder", "decode", "words"}, path.name
        assert min(stages.values()) >= 0 and sum(stages.values()) <= meta["compute_seconds"] + 1e-3, (path.name, meta)
    assert set(stats["stages"]) == {
        "read",
        "resample",
        "features",
        "encoder",
        "decode",
        "words",
        "other",
        "write",
        "ray_overhead",
    }
    assert min(stats["stages"].values()) >= 0 and stats["stages"]["encoder"] > 0 and stats["stages"]["write"] > 0
    assert abs(sum(stats["stage_fractions"].values()) - 1) < 1e-3


# --- words ------------------------------------------------------------------------------------------


def check_words(rows: list[dict], frame_seconds: float) -> None:
    """Words (`timestamps: true`, the default) spell the row's text, in time order inside the audio, with
    confidence in [0, 1] (the utterance's is the words' mean); error rows have none."""
    for r in rows:
        if r["status"] == "error":
            assert r["words"] is None and r["confidence"] is None, r
            continue
        words = r["words"]
        assert "".join(w["word"] for w in words) == r["text"].replace(" ", ""), r
        starts = [w["start"] for w in words]
        assert starts == sorted(starts)
        end = r["offset"] + r["duration"] + frame_seconds
        assert all(r["offset"] <= w["start"] <= w["end"] <= end for w in words), r
        assert all(0.0 <= w["confidence"] <= 1.0 for w in words)
        if words:
            assert abs(r["confidence"] - sum(w["confidence"] for w in words) / len(words)) < 1e-9
        else:
            assert r["confidence"] is None
