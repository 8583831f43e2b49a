"""Shared fixtures: espeak-ng speech, a tiny QuartzNet trained in the session, QuartzNet15x5.

Everything is generated here; nothing is downloaded. Session-scoped so the suite pays once.
"""

from __future__ import annotations

import logging
import os

import numpy as np
import pytest
import soundfile as sf
import torch

from runner.training.corpus import espeak_available, sentences, synthesize_many

from .support import RATE, TEST_SEED, TRAIN_SEED, TRAIN_SENTENCES

RELIABILITY: list[dict] = []  # outcomes of the fault-injection tests, printed at the end of the run


def pytest_configure(config):
    logging.getLogger("nemo_logger").setLevel(logging.ERROR)
    torch.set_num_threads(int(os.environ.get("ASR_RUNNER_TEST_THREADS", "2")))  # CI: 2 cores


def pytest_terminal_summary(terminalreporter):
    """The README's Reliability table, measured by this run (faults injected by the tests), then the CPU
    the run measured on: a test's figures depend on its int8 kind, and a CI log names no machine."""
    if RELIABILITY:
        terminalreporter.section("reliability: faults injected and their measured outcome")
        terminalreporter.write_line(
            "| fault | injected by | manifest rows | rows lost | rows duplicated | parts recomputed | outcome |"
        )
        terminalreporter.write_line("|---|---|---|---|---|---|---|")
        for r in RELIABILITY:
            terminalreporter.write_line(
                f"| {r['fault']} | {r['injection']} | {r['rows']} | {r['lost']} | {r['duplicated']} "
                f"| {r['recomputed']} | {r['outcome']} |"
            )
    from runner.sysinfo import cpu_info, cpu_label, int8_flags, int8_kind

    cpu, flags = cpu_info(), int8_flags()
    terminalreporter.write_line(
        f"cpu: {cpu_label(cpu)}, {cpu.get('cpuid', cpu['machine'])}, {cpu['logical_cpus']} logical; flags "
        f"{' '.join(cpu['flags']) or '-'}; int8 kind {int8_kind(flags)}"
        + (f" (flags overridden: {' '.join(flags)})" if flags != cpu["flags"] else "")
    )


@pytest.fixture
def reliability():
    """`record(fault, injection, manifest_ids, table_ids, recomputed, outcome)` for the summary table."""

    def record(fault: str, injection: str, manifest_ids, table_ids, recomputed, outcome: str) -> None:
        table_ids = list(table_ids)
        RELIABILITY.append(
            {
                "fault": fault,
                "injection": injection,
                "rows": len(manifest_ids),
                "lost": len(set(manifest_ids) - set(table_ids)),
                "duplicated": len(table_ids) - len(set(table_ids)),
                "recomputed": recomputed,
                "outcome": outcome,
            }
        )

    return record


@pytest.fixture(scope="module")
def ray_local():
    """A real local Ray cluster with 2 CPUs for the tests of one module."""
    ray = pytest.importorskip("ray")
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session", autouse=True)
def _require_espeak():
    if not espeak_available():
        pytest.exit("espeak-ng is required (apt-get install -y espeak-ng); .ci/run installs it", returncode=3)


@pytest.fixture(scope="session")
def speech() -> list[tuple[str, np.ndarray]]:
    """40 held-out utterances (sentences not in the training set), mixed voices and lengths."""
    train = set(sentences(TRAIN_SENTENCES, TRAIN_SEED))
    texts = [t for t in sentences(80, TEST_SEED) if t not in train][:40]
    return [(text, audio) for text, _voice, audio in synthesize_many(texts, TEST_SEED)]


@pytest.fixture(scope="session")
def speech_files(speech, tmp_path_factory) -> list[tuple[str, str]]:
    """The `speech` utterances as 16 kHz WAV files: (text, path)."""
    folder = tmp_path_factory.mktemp("speech")
    out = []
    for i, (text, audio) in enumerate(speech):
        path = folder / f"utt{i:03d}.wav"
        sf.write(path, audio, RATE)
        out.append((text, str(path)))
    return out


@pytest.fixture(scope="session")
def train_speech() -> list[tuple[str, np.ndarray]]:
    """The training utterances (text, audio) of the models trained in the session, synthesized once."""
    return [(t, a) for t, _v, a in synthesize_many(sentences(TRAIN_SENTENCES, TRAIN_SEED), TRAIN_SEED)]


@pytest.fixture(scope="session")
def tiny_nemo(train_speech):
    """A NeMo QuartzNet (0.17 M parameters) trained for ~2 minutes on espeak-ng speech: real transcripts
    (held-out CER ~5%, WER ~13%), so that comparisons with NeMo are not decided by near-ties."""
    from runner.training.recipes import build_nemo_model, tiny_quartznet_config, train_ctc

    torch.manual_seed(0)
    model = build_nemo_model(tiny_quartznet_config())
    return train_ctc(model, train_speech, steps=800, seed=0)


@pytest.fixture(scope="session")
def tiny_nemo_file(tiny_nemo, tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("models") / "tiny_quartznet.nemo"
    tiny_nemo.save_to(str(path))
    return str(path)


@pytest.fixture(scope="session")
def tiny_lean(tiny_nemo):
    from runner.model.ctc import build_model
    from runner.model.nemo_loader import describe

    return build_model(*describe(tiny_nemo))


@pytest.fixture(scope="session")
def quartznet15x5_nemo():
    """NeMo's QuartzNet15x5 architecture (18.9 M parameters) with random weights and BN statistics."""
    from runner.training.recipes import build_nemo_model, quartznet15x5_config, randomize_batchnorm

    torch.manual_seed(0)
    model = build_nemo_model(quartznet15x5_config())
    randomize_batchnorm(model)
    return model


@pytest.fixture(scope="session")
def long_speech(tmp_path_factory):
    """A >= 10-minute FLAC of espeak-ng speech (held-out sentences, mixed voices): (path, reference)."""
    texts = sentences(400, seed=7)
    pieces, refs, total = [], [], 0
    gap = np.zeros(int(0.3 * RATE), np.float32)
    for text, _voice, audio in synthesize_many(texts, seed=7):
        pieces += [audio, gap]
        refs.append(text)
        total += len(audio) + len(gap)
        if total >= 610 * RATE:
            break
    path = tmp_path_factory.mktemp("long") / "long speech.flac"
    sf.write(path, np.concatenate(pieces), RATE)
    return str(path), " ".join(refs)
