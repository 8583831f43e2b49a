"""Transducers (RNN-T, TDT, hybrid RNN-T/TDT + CTC): the lean model decodes exactly as NeMo, int8, a job.

Real NeMo models from configs (`runner.training.transducers`): random-weight FastConformer transducers of
each kind, their joints set up so that greedy decoding meets every case (blanks, several labels on one
frame, TDT durations 0-4), saved as `.nemo` and read back without NeMo; and a small RNN-T trained in the
session on espeak-ng speech for transcripts, int8 agreement and a job on a local Ray cluster.
"""

import json

import pytest
import soundfile as sf
import torch

from runner.errors import UnsupportedModelError
from runner.metrics import wer
from runner.model.ctc import build_model
from runner.model.nemo_loader import check_supported, load_nemo
from runner.model.transcribe import DecodeOptions, transcribe, transcribe_batch, word_aligner

from .support import TRAIN_SEED, TRAIN_SENTENCES, calibration_audio, held_out_gate, pinned_engine, write_manifest

KINDS = [  # (kind, subword vocabulary, head the job asks for)
    ("rnnt", False, None),
    ("rnnt", True, None),
    ("tdt", True, None),
    ("tdt", False, None),
    ("hybrid-rnnt", True, "rnnt"),
    ("hybrid-tdt", True, "rnnt"),
    ("hybrid-tdt", True, "ctc"),
]


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory) -> str:
    from runner.training.corpus import sentences
    from runner.training.recipes import train_tokenizer

    return train_tokenizer(sentences(TRAIN_SENTENCES, TRAIN_SEED), tmp_path_factory.mktemp("spm"), vocab_size=128)


def random_transducer(kind: str, tokenizer: str | None, seed: int = 0):
    from runner.training.transducers import build_transducer, randomize_transducer, transducer_config

    torch.manual_seed(seed)
    model = build_transducer(transducer_config(kind, tokenizer_dir=tokenizer))
    randomize_transducer(model, seed=seed)
    return model


@pytest.mark.parametrize("kind,subword,head", KINDS)
def test_random_transducers_decode_exactly_as_nemo(kind, subword, head, tokenizer_dir, speech, tmp_path):
    """Saved as `.nemo` and read back without NeMo: the same tokens, at the same frames (TDT: the same
    durations), and the same text as NeMo's own `transcribe()`, in mixed-length batches of 4."""
    from runner.training.transducers import nemo_greedy

    nemo = random_transducer(kind, tokenizer_dir if subword else None)
    path = tmp_path / "model.nemo"
    nemo.save_to(str(path))
    lean = build_model(*load_nemo(path, head))
    assert lean.spec.head == ("ctc" if head == "ctc" else kind.removeprefix("hybrid-"))
    audios = [a for _, a in speech[:12]]
    theirs = nemo_greedy(nemo, audios, batch_size=4, head=head)
    ours = transcribe_batch(lean, audios, DecodeOptions(batch_size=4))
    assert ours == [t["text"] for t in theirs]
    if lean.head is None:
        return
    tokens = sum(len(t["tokens"]) for t in theirs)
    frames = sum(int(n) for n in _frames(lean, audios))
    assert frames > tokens > 3 * len(audios), (tokens, frames)  # blanks and labels both, not a degenerate joint
    # NeMo's batched TDT loop records, for an utterance that found its label before its batch-mates, the
    # duration the inner loop last computed for it (at another frame): its durations (and TDT word ends)
    # depend on the batch. Alone, each utterance gets the duration predicted with its label; so do ours.
    alone = nemo_greedy(nemo, audios, batch_size=1, head=head) if "durations" in theirs[0] else theirs
    for i in range(0, len(audios), 4):
        hyps = _greedy(lean, audios[i : i + 4])
        for b, t in enumerate(theirs[i : i + 4]):
            assert hyps.tokens[b] == t["tokens"] and hyps.frames[b] == t["frames"], (i + b, kind)
            if "durations" in t:
                assert hyps.durations[b] == alone[i + b]["durations"], (i + b, kind)
                assert alone[i + b]["tokens"] == t["tokens"]
    if kind.endswith("rnnt"):  # several labels on one frame happen, and the per-frame limit holds
        most = max(t["frames"].count(f) for t in theirs for f in set(t["frames"]))
        assert 2 <= most <= lean.spec.transducer.max_symbols


@torch.inference_mode()
def _greedy(lean, audios):
    from runner.model.transcribe import pad_batch

    frames, lens = lean(*pad_batch(audios))
    return lean.head.greedy(frames, lens)


@torch.inference_mode()
def _frames(lean, audios):
    from runner.model.transcribe import pad_batch

    return lean(*pad_batch(audios))[1].tolist()


def test_a_transducer_transcript_does_not_depend_on_its_batch(tokenizer_dir, speech, tmp_path):
    nemo = random_transducer("tdt", tokenizer_dir, seed=1)
    path = tmp_path / "model.nemo"
    nemo.save_to(str(path))
    lean = build_model(*load_nemo(path))
    audios = [a for _, a in speech[:8]]
    batched = transcribe_batch(lean, audios, DecodeOptions(batch_size=8))
    assert batched == [transcribe_batch(lean, [a])[0] for a in audios]


REFUSED = [
    ({"encoder": {"_target_": "nemo.collections.asr.modules.ConvASREncoder"}}, "encoder=ConvASREncoder"),
    ({"decoder": {"blank_as_pad": False}}, "blank_as_pad=false"),
    ({"decoder": {"prednet": {"norm": "layer"}}}, "prednet.norm='layer'"),
    ({"loss": {"loss_name": "multiblank_rnnt"}}, "multiblank_rnnt"),
    ({"joint": {"jointnet": {"activation": "gelu"}}}, "activation='gelu'"),
]


@pytest.mark.parametrize("change,named", REFUSED)
def test_unsupported_transducers_are_refused_naming_what_was_found(change, named):
    from runner.training.transducers import transducer_config

    config = transducer_config("rnnt")
    for key, value in change.items():
        if "_target_" in value:
            config[key] = value
        else:
            _merge(config[key], value)
    with pytest.raises(UnsupportedModelError, match=named.replace("(", r"\(").replace("'", "'")):
        check_supported(config, "x.nemo")


def _merge(into: dict, change: dict) -> None:
    for k, v in change.items():
        if isinstance(v, dict):
            _merge(into.setdefault(k, {}), v)
        else:
            into[k] = v


def test_ctc_head_asked_of_a_model_without_one_is_refused(tmp_path):
    from runner.training.transducers import build_transducer, transducer_config

    path = tmp_path / "rnnt.nemo"
    build_transducer(transducer_config("rnnt")).save_to(str(path))
    with pytest.raises(UnsupportedModelError, match="no CTC decoder"):
        load_nemo(path, "ctc")


# ---------------------------------------------------------------------------------- a trained RNN-T
@pytest.fixture(scope="module")
def trained(train_speech, tmp_path_factory):
    """A small FastConformer RNN-T (characters) trained in the session on the espeak-ng training set."""
    from runner.training.transducers import build_transducer, train_transducer, transducer_config

    torch.manual_seed(0)
    model = build_transducer(transducer_config("rnnt"))
    model = train_transducer(model, train_speech, steps=TRAIN_STEPS, batch_size=16, lr=5e-3, seed=0)
    path = tmp_path_factory.mktemp("models") / "tiny_rnnt.nemo"
    model.save_to(str(path))
    return model, str(path)


TRAIN_STEPS = 400  # ~80 s on 2 cores; held-out CER ~5.5%


def test_trained_transducer_matches_nemo_transcribe(trained, speech):
    from runner.training.transducers import nemo_greedy

    nemo, path = trained
    lean = build_model(*load_nemo(path))
    audios = [a for _, a in speech[:40]]
    theirs = [t["text"] for t in nemo_greedy(nemo, audios, batch_size=8)]
    ours = transcribe_batch(lean, audios, DecodeOptions(batch_size=8))
    assert ours == theirs
    refs = [t for t, _ in speech[:40]]
    print(f"trained tiny RNN-T: WER {wer(refs, ours):.3f} on 40 held-out utterances")
    assert wer(refs, ours) < 0.6  # it transcribes: not a model that emits nothing


def test_trained_transducer_words_follow_its_alignment(trained, speech):
    """Words from the transducer's own frames: NeMo's word offsets (frame x 10 ms x subsampling)."""
    nemo, path = trained
    lean = build_model(*load_nemo(path))
    audios = [a for _, a in speech[:16]]
    ours = transcribe(lean, audios, DecodeOptions(batch_size=8), aligner=word_aligner(lean))
    theirs = nemo_words(nemo, audios)
    step = 0.01 * lean.spec.encoder.subsampling
    compared = 0
    for mine, words in zip(ours, theirs):
        assert [w["word"] for w in mine.words] == [w["word"] for w in words]
        for a, b in zip(mine.words, words):
            assert a["start"] == pytest.approx(b["start_offset"] * step) and a["end"] == pytest.approx(
                b["end_offset"] * step
            )
            assert 0.0 <= a["confidence"] <= 1.0
            compared += 1
    assert compared >= 40


def nemo_words(nemo, audios) -> list[list[dict]]:
    """NeMo's word offsets (`transcribe(timestamps=True)`: `timestamp["word"]`, in encoder frames)."""
    import numpy as np

    hyps = nemo.transcribe([np.asarray(a, np.float32) for a in audios], batch_size=8, timestamps=True, verbose=False)
    hyps = hyps[0] if isinstance(hyps, tuple) else hyps
    return [h.timestamp["word"] for h in hyps]


@pytest.fixture(scope="module")
def int8_artifact(trained):
    from runner.int8.config import Settings
    from runner.int8.pipeline import quantize_model

    _nemo, path = trained
    lean = build_model(*load_nemo(path))
    gate = held_out_gate(24)
    settings = Settings(max_wer_increase=0.02, engine=pinned_engine())
    return quantize_model(lean, calibration_audio(8), [a for _, a in gate], [t for t, _ in gate], settings)


def test_transducer_int8_agrees_with_fp32(trained, int8_artifact, speech):
    from runner.int8.artifact import build_int8_model

    _nemo, path = trained
    lean = build_model(*load_nemo(path))
    report = int8_artifact.report
    assert report["gate"]["passed"], report["gate"]
    int8 = build_int8_model(int8_artifact.to_bytes(), report["engine"]).model
    assert int8.head is not None and int8.reader.head is int8.head  # prediction + joint travel in the artifact
    audios = [a for _, a in speech]
    fp32_texts = transcribe_batch(lean, audios)
    int8_texts = transcribe_batch(int8, audios)
    print(f"tiny RNN-T int8 vs fp32 WER {wer(fp32_texts, int8_texts):.4f} on {len(audios)} utterances")
    assert wer(fp32_texts, int8_texts) <= 0.01


def test_transducer_int8_job_on_local_ray(ray_local, trained, speech_files, tmp_path):
    from runner.job.run import run_job
    from runner.job.run_folder import read_rows
    from runner.job.spec import load_spec

    _nemo, path = trained
    manifest = write_manifest(
        tmp_path / "manifest.jsonl",
        [{"audio_filepath": p, "duration": sf.info(p).duration, "text": t} for t, p in speech_files[:24]],
    )
    out = tmp_path / "run"
    spec_path = tmp_path / "job.yaml"
    spec_path.write_text(
        f"model: {path}\nmanifest: {manifest}\noutput: {out}\nprecision: int8\n"
        "workers: 2\nshard_seconds: 20\nquantization:\n  calibration_items: 8\n  max_wer_increase: 0.05\n"
    )
    run_job(load_spec(spec_path))
    rows = read_rows(out).to_pylist()
    assert len(rows) == 24 and all(r["status"] == "ok" for r in rows)
    assert all(r["words"] is not None for r in rows) and any(r["words"] for r in rows)
    stats = json.loads((out / "stats.json").read_text())
    assert stats["precision"] == "int8" and stats["worker_heavy_imports"] == []
    assert all(w["int8_check"]["passed"] for w in stats["worker_info"].values())


def test_transducer_long_file_in_windows(trained):
    """A 2-minute recording (40 held-out sentences, 0.3 s apart). Whole, it decodes exactly as NeMo's
    `transcribe()` of the whole file (NeMo's attention over a 10-minute file needs more memory than CI
    has). In 20 s windows, their projected frames are concatenated and decoded in one pass, so the
    prediction network's state runs through the file; as for Conformer-CTC, windows change what the
    attention sees, and what must hold is accuracy against the whole file. (This tiny model, trained on
    single utterances, drops words on continuous speech: CER ~0.55-0.6 here, ~0.06 sentence by sentence.)"""
    import numpy as np

    from runner.metrics import cer
    from runner.training.corpus import sentences, synthesize_many
    from runner.training.transducers import nemo_greedy

    nemo, path = trained
    lean = build_model(*load_nemo(path))
    texts = sentences(40, seed=7)
    gap = np.zeros(4800, np.float32)
    audio = np.concatenate([x for _t, _v, a in synthesize_many(texts, seed=7) for x in (a, gap)])
    reference = " ".join(texts)
    whole = transcribe_batch(lean, [audio], DecodeOptions(window_seconds=1e9))[0]
    assert whole == nemo_greedy(nemo, [audio], batch_size=1)[0]["text"]
    options = DecodeOptions(window_seconds=20, context_seconds=5)
    windowed = transcribe(lean, [audio], options, aligner=word_aligner(lean))
    whole_cer, windowed_cer = cer([reference], [whole]), cer([reference], [windowed[0].text])
    print(f"tiny RNN-T, {len(audio) / 16000:.0f} s file: CER whole {whole_cer:.3f}, windows 20+5 s {windowed_cer:.3f}")
    # On this model both are poor and differ by a few points either way (measured: 0.553 whole, 0.597 in
    # 20 s windows); a window border that lost or repeated frames, or reset the prediction network, costs more.
    assert windowed_cer <= whole_cer + 0.1, (windowed_cer, whole_cer)
    starts = [w["start"] for w in windowed[0].words]
    assert starts == sorted(starts) and starts[-1] > len(audio) / 16000 - 20  # times run on through the file


def test_hybrid_job_with_the_ctc_head(ray_local, tokenizer_dir, speech_files, tmp_path, capsys):
    """`decoder: ctc` in the job spec runs a hybrid model's CTC head, as NeMo's own CTC decoding does."""
    from runner.inputs.audio import load_audio
    from runner.job.run import run_job
    from runner.job.run_folder import read_rows
    from runner.job.spec import load_spec
    from runner.training.transducers import nemo_greedy

    nemo = random_transducer("hybrid-tdt", tokenizer_dir)
    model = tmp_path / "hybrid.nemo"
    nemo.save_to(str(model))
    files = [p for _, p in speech_files[:6]]
    manifest = write_manifest(
        tmp_path / "manifest.jsonl", [{"audio_filepath": p, "duration": sf.info(p).duration} for p in files]
    )
    out = tmp_path / "run"
    spec_path = tmp_path / "job.yaml"
    spec_path.write_text(
        f"model: {model}\nmanifest: {manifest}\noutput: {out}\nprecision: fp32\nworkers: 2\ndecoder: ctc\n"
    )
    run_job(load_spec(spec_path))
    rows = {r["audio_filepath"]: r["text"] for r in read_rows(out).to_pylist()}
    theirs = nemo_greedy(nemo, [load_audio(p, 16000) for p in files], batch_size=4, head="ctc")
    assert [rows[p] for p in files] == [t["text"] for t in theirs]
    assert json.loads((out / "job.json").read_text())["fingerprint"]["decoder"] == "ctc"
    from runner.cli.main import main  # the same head from the command line

    assert main(["transcribe", str(model), *files, "--decoder", "ctc"]) == 0
    printed = dict(line.split("\t", 1) for line in capsys.readouterr().out.splitlines())
    assert [printed[p] for p in files] == [t["text"] for t in theirs]


@pytest.mark.parametrize("kind", ["rnnt", "tdt"])
def test_token_confidence_is_nemos_with_and_without_blanks(kind, tokenizer_dir, speech, tmp_path):
    """Each token's confidence equals NeMo's `Hypothesis.token_confidence` (greedy_batch, batches of 4), blank
    steps excluded (NeMo's default) and included (`exclude_blank: false`: NeMo records every step; RNN-T
    credits a token with the blanks of the frames up to the next token's, TDT with every blank step up
    to the next label), with `mean` aggregation (which every credited step moves) and `min`."""
    from runner.model.transcribe import pad_batch
    from runner.model.words import ConfidenceMethod
    from runner.training.nemo_words import nemo_transducer_token_confidence

    nemo = random_transducer(kind, tokenizer_dir, seed=2)
    nemo.save_to(str(tmp_path / "model.nemo"))
    lean = build_model(*load_nemo(tmp_path / "model.nemo"))
    audios = [a for _, a in speech[:8]]
    with torch.inference_mode():
        batches = [lean(*pad_batch(audios[i : i + 4])) for i in range(0, len(audios), 4)]
    mine = {}
    for exclude_blank in (True, False):
        for aggregation in ("mean", "min"):
            method = ConfidenceMethod(exclude_blank=exclude_blank, aggregation=aggregation)
            theirs = nemo_transducer_token_confidence(nemo, audios, method, batch_size=4)
            aligner = word_aligner(lean, method)
            blanks = None if exclude_blank else aligner.step_confidence
            ours = []
            for frames, lengths in batches:
                hyps = lean.head.greedy(frames, lengths, keep_log_probs=True, blank_confidence=blanks)
                for b in range(len(hyps.tokens)):
                    credit = None if exclude_blank else hyps.blank_confidence[b]
                    conf = aligner.transducer_token_confidence(hyps.frames[b], hyps.log_probs[b], credit, kind == "tdt")
                    ours.append((hyps.tokens[b], conf))
            assert sum(len(t["confidence"]) for t in theirs) > 3 * len(audios)
            for (tokens, conf), t in zip(ours, theirs):
                assert tokens == t["tokens"]
                assert conf == pytest.approx(t["confidence"], rel=1e-4, abs=1e-12), (exclude_blank, aggregation)
            mine[exclude_blank, aggregation] = [c for _, conf in ours for c in conf]
    assert mine[True, "mean"] != mine[False, "mean"]  # the blanks were counted
    words = {}  # and a job's words get them: transcribe() passes the blank steps on when asked to count them
    for exclude_blank in (True, False):
        aligner = word_aligner(lean, ConfidenceMethod(exclude_blank=exclude_blank, aggregation="mean"))
        done = transcribe(lean, audios, DecodeOptions(batch_size=4), aligner=aligner)
        words[exclude_blank] = [w["confidence"] for t in done for w in t.words]
        assert all(0.0 <= c <= 1.0 for c in words[exclude_blank])
    assert len(words[True]) == len(words[False]) > len(audios) and words[True] != words[False]
