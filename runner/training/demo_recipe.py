"""The demo model recipe: a small QuartzNet trained on espeak-ng speech, and the bundled demo sets.

    python -m runner.training.demo_recipe --out-model runner/data/demo_quartznet.nemo \\
        --manifests manifests/demo --seed 0 --time-limit 3000

1. Draws disjoint sentence splits from `demo_corpus.demo_sentences` (test, calibration, dev, train:
   no sentence is in two splits), with voices from `demo_corpus.DEMO_VOICES` at 120-200 words per
   minute and pitch 25-75.
2. Writes the bundled demo sets: `<manifests>/test/*.flac` and `<manifests>/calibration/*.flac`
   (16 kHz mono FLAC, silence trimmed, peak 0.3 to keep them small) with NeMo JSONL manifests
   `test.jsonl` and `calibration.jsonl` whose `audio_filepath` is relative to the manifest.
3. Synthesizes the training corpus in memory (int16; about `--hours` of audio).
4. Trains a 1.8 M-parameter QuartzNet 5x3 (256 channels, stride 2) with AdamW for at most
   `--time-limit` seconds: length-bucketed batches of about `--batch-seconds` of audio, random
   gain, Gaussian noise on a fraction of the utterances, a start shift; the learning rate warms up
   then follows a cosine over the time budget (or over `--steps` when given: then the run is
   exactly reproducible, apart from thread-count effects on floating point sums).
5. Saves the `.nemo`, decodes the written test and calibration FLACs with the lean model (greedy
   CTC, fp32) and writes WER/CER and the run's facts to `--report` (default: demo_model.json next
   to the model).

Everything is seeded. With `--time-limit` and no `--steps`, the number of steps (and so the exact
weights) depends on the machine's speed; the report records the steps so that `--steps N` can
repeat a run.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import random
import shlex
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from runner.metrics import cer, normalize_text, wer
from runner.training import corpus, demo_corpus
from runner.training.demo_batches import augmented_batch, bucketed_batches, lr_at, nemo_transcribe
from runner.training.demo_data import RATE, du_bytes, read_manifest, synthesize_split, write_split
from runner.training.recipes import _block, ctc_config

log = logging.getLogger("runner.training.demo_recipe")


def demo_quartznet_config() -> dict:
    """QuartzNet 5x3 at 256 channels with CPU-sized kernels: 1.82 M parameters.

    Prologue (k33, stride 2), five blocks of three residual separable sub-blocks (kernels 11..25,
    a third of QuartzNet15x5's), epilogue k29 dilation 2 at 512 channels and a 512 1x1 conv.
    """
    blocks = [_block(256, 1, 33, stride=2)]
    blocks += [_block(256, 3, k, residual=True) for k in (11, 13, 17, 21, 25)]
    blocks += [_block(512, 1, 29, dilation=2), _block(512, 1, 1, separable=False)]
    return ctc_config(blocks)


# --- audio -------------------------------------------------------------------------------------------


# --- training ----------------------------------------------------------------------------------------


def train_demo(
    model,
    texts: Sequence[str],
    audios: Sequence[np.ndarray],
    *,
    seed: int,
    time_limit: float,
    steps: int | None = None,
    batch_seconds: float = 40.0,
    lr: float = 3e-3,
    weight_decay: float = 1e-3,
    log_every: int = 25,
    dev: tuple | None = None,
    eval_every: float = 300.0,
) -> dict:
    """Train a NeMo CTC model in place (see the module docstring); returns the run's facts.

    The schedule follows `step / steps` when `steps` is given, else the elapsed fraction of
    `time_limit`; training stops at whichever ends first.
    """
    torch.manual_seed(seed)
    rng = random.Random(seed)
    nrng = np.random.default_rng(seed)
    index = {c: i for i, c in enumerate(model.decoder.vocabulary)}
    targets = [torch.tensor([index[c] for c in t]) for t in texts]
    lengths = [len(a) + int(0.25 * RATE) for a in audios]
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    model.train()
    start = time.monotonic()
    step, epoch, seen, last_eval, run_loss = 0, 0, 0.0, start, None
    history = []
    done = False
    while not done:
        epoch += 1
        for ids in bucketed_batches(lengths, int(batch_seconds * RATE), rng):
            elapsed = time.monotonic() - start
            progress = step / steps if steps else elapsed / time_limit
            if progress >= 1.0 or elapsed >= time_limit:
                done = True
                break
            for group in opt.param_groups:
                group["lr"] = lr_at(progress, lr)
            signal, signal_lengths = augmented_batch([audios[i] for i in ids], nrng)
            tgt = [targets[i] for i in ids]
            log_probs, enc_lengths, _ = model(input_signal=signal, input_signal_length=signal_lengths)
            loss = model.loss(
                log_probs=log_probs,
                targets=torch.nn.utils.rnn.pad_sequence(tgt, batch_first=True),
                input_lengths=enc_lengths,
                target_lengths=torch.tensor([len(t) for t in tgt]),
            )
            opt.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 5.0)
            opt.step()
            step += 1
            seen += float(signal_lengths.sum()) / RATE
            value = float(loss.item())
            run_loss = value if run_loss is None or not math.isfinite(run_loss) else 0.9 * run_loss + 0.1 * value
            if step % log_every == 0:
                log.info(
                    "step %d epoch %d loss %.3f lr %.2e audio %.2f h (%.0f s)",
                    step,
                    epoch,
                    run_loss,
                    opt.param_groups[0]["lr"],
                    seen / 3600,
                    time.monotonic() - start,
                )
            if dev and time.monotonic() - last_eval >= eval_every:
                hyps = nemo_transcribe(model, dev[1])
                row = dict(
                    step=step,
                    seconds=round(time.monotonic() - start),
                    loss=round(run_loss, 4),
                    dev_wer=round(wer(dev[0], hyps), 4),
                    dev_cer=round(cer(dev[0], hyps), 4),
                )
                history.append(row)
                log.info("dev: %s | e.g. %r -> %r", row, dev[0][0], hyps[0])
                last_eval = time.monotonic()
    model.eval()
    return dict(
        steps=step,
        epochs=round(seen / max(1.0, sum(len(a) for a in audios) / RATE), 2),
        train_seconds=round(time.monotonic() - start, 1),
        audio_hours_processed=round(seen / 3600, 2),
        final_loss=round(run_loss or float("nan"), 4),
        dev_history=history,
    )


# --- the recipe --------------------------------------------------------------------------------------


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m runner.training.demo_recipe", description=__doc__.split("\n\n")[0])
    p.add_argument("--out-model", default="runner/data/demo_quartznet.nemo")
    p.add_argument("--manifests", default="manifests/demo", help="folder for the bundled demo sets")
    p.add_argument("--report", default=None, help="JSON report (default: demo_model.json next to the model)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--time-limit", type=float, default=3000.0, help="training seconds at most")
    p.add_argument("--steps", type=int, default=None, help="fixed step count (schedule over steps, not time)")
    p.add_argument("--hours", type=float, default=12.0, help="training audio to synthesize, hours")
    p.add_argument("--test-count", type=int, default=125)
    p.add_argument("--calibration-count", type=int, default=100)
    p.add_argument("--dev-count", type=int, default=60, help="held-out utterances for progress checks")
    p.add_argument("--batch-seconds", type=float, default=40.0, help="padded audio per batch, seconds")
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--eval-every", type=float, default=300.0, help="seconds between dev checks")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> dict:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    if args.threads:
        torch.set_num_threads(args.threads)
    if not corpus.espeak_available():
        sys.exit("espeak-ng is required (apt-get install -y espeak-ng)")
    command = "python -m runner.training.demo_recipe " + " ".join(shlex.quote(a) for a in (argv or sys.argv[1:]))
    out_model = Path(args.out_model)
    report_path = Path(args.report) if args.report else out_model.with_name("demo_model.json")
    folder = Path(args.manifests)
    random.seed(args.seed)
    np.random.seed(args.seed)

    # Sentences: disjoint splits. The train split is sized generously; synthesis stops at --hours.
    max_train = int(args.hours * 3600 / 1.5) + 100
    splits = demo_corpus.demo_splits(
        {"test": args.test_count, "calibration": args.calibration_count, "dev": args.dev_count, "train": max_train},
        args.seed,
    )
    names = list(splits)
    for a in range(len(names)):
        for b in range(a + 1, len(names)):
            assert not set(splits[names[a]]) & set(splits[names[b]]), (names[a], names[b])

    t0 = time.monotonic()
    seeds = {name: args.seed * 1000 + k for k, name in enumerate(("test", "calibration", "dev", "train"), 1)}
    held = {name: synthesize_split(splits[name], seeds[name], log_every=0) for name in ("test", "calibration", "dev")}
    for name in ("test", "calibration"):
        path = write_split(folder, name, held[name][0], held[name][1])
        log.info("wrote %s (%d utterances)", path, len(held[name][0]))
    manifests_bytes = du_bytes(folder)
    log.info("%s: %.2f MB on disk", folder, manifests_bytes / 1e6)
    train_texts, train_audio, _ = synthesize_split(splits["train"], seeds["train"], args.hours * 3600)
    synth_seconds = time.monotonic() - t0
    train_hours = sum(len(a) for a in train_audio) / RATE / 3600
    log.info(
        "training corpus: %d utterances, %.2f h (synthesized in %.0f s)", len(train_texts), train_hours, synth_seconds
    )
    words = {w for t in train_texts for w in t.split()}
    unseen = {w for name in ("test", "calibration") for t in held[name][0] for w in t.split()} - words

    from runner.model.nemo_loader import quiet_nemo_logging
    from runner.training.recipes import build_nemo_model

    quiet_nemo_logging()
    torch.manual_seed(args.seed)
    model = build_nemo_model(demo_quartznet_config())
    quiet_nemo_logging()
    params = sum(p.numel() for p in model.parameters())
    log.info(
        "model: %d parameters; training for at most %.0f s%s on %d thread(s)",
        params,
        args.time_limit,
        f" / {args.steps} steps" if args.steps else "",
        torch.get_num_threads(),
    )
    facts = train_demo(
        model,
        train_texts,
        train_audio,
        seed=args.seed,
        time_limit=args.time_limit,
        steps=args.steps,
        batch_seconds=args.batch_seconds,
        lr=args.lr,
        dev=(held["dev"][0], held["dev"][1]),
        eval_every=args.eval_every,
    )
    log.info("trained: %s", {k: v for k, v in facts.items() if k != "dev_history"})

    out_model.parent.mkdir(parents=True, exist_ok=True)
    model.save_to(str(out_model))
    log.info("saved %s (%.2f MB)", out_model, out_model.stat().st_size / 1e6)

    # Evaluate what ships: the saved .nemo through the lean model, on the FLACs as written.
    from runner.model.ctc import build_model
    from runner.model.nemo_loader import load_nemo
    from runner.model.transcribe import transcribe_batch

    t1 = time.monotonic()
    lean = build_model(*load_nemo(out_model)).eval()
    results = {}
    for name in ("test", "calibration"):
        refs, audios = read_manifest(folder / f"{name}.jsonl")
        hyps = transcribe_batch(lean, audios)
        refs = [normalize_text(r) for r in refs]
        hyps = [normalize_text(h) for h in hyps]
        results[name] = dict(
            utterances=len(refs),
            wer=round(wer(refs, hyps), 4),
            cer=round(cer(refs, hyps), 4),
            audio_seconds=round(sum(len(a) for a in audios) / RATE, 1),
        )
        bad = [(r, h) for r, h in zip(refs, hyps) if r != h][:5]
        log.info(
            "%s: WER %.4f CER %.4f (%d utterances); e.g. %s",
            name,
            results[name]["wer"],
            results[name]["cer"],
            len(refs),
            bad,
        )
    nemo_hyps = nemo_transcribe(model, read_manifest(folder / "test.jsonl")[1])
    nemo_test = dict(
        wer=round(wer(held["test"][0], [normalize_text(h) for h in nemo_hyps]), 4),
        cer=round(cer(held["test"][0], [normalize_text(h) for h in nemo_hyps]), 4),
    )

    import nemo

    report = dict(
        command=command,
        seed=args.seed,
        time_limit=args.time_limit,
        threads=torch.get_num_threads(),
        model=str(out_model),
        model_bytes=out_model.stat().st_size,
        parameters=params,
        architecture="QuartzNet 5x3, 256 channels, prologue k33 stride 2, kernels 11/13/17/21/25, "
        "epilogue k29 dilation 2 (512) + 1x1 (512), char CTC",
        test_wer=results["test"]["wer"],
        test_cer=results["test"]["cer"],
        calibration_wer=results["calibration"]["wer"],
        calibration_cer=results["calibration"]["cer"],
        nemo_test_wer=nemo_test["wer"],
        nemo_test_cer=nemo_test["cer"],
        decoding="greedy CTC, fp32, lean model",
        steps=facts["steps"],
        train_seconds=facts["train_seconds"],
        epochs=facts["epochs"],
        audio_hours=round(train_hours, 3),
        train_utterances=len(train_texts),
        train_words=len(words),
        audio_hours_processed=facts["audio_hours_processed"],
        final_loss=facts["final_loss"],
        batch_seconds=args.batch_seconds,
        lr=args.lr,
        synthesis_seconds=round(synth_seconds, 1),
        eval_seconds=round(time.monotonic() - t1, 1),
        splits={k: len(v[0]) for k, v in held.items()},
        held_out_words_not_in_training=sorted(unseen),
        manifests=str(folder),
        manifests_bytes=du_bytes(folder),
        voices=list(demo_corpus.DEMO_VOICES),
        versions=dict(torch=torch.__version__, nemo=nemo.__version__, python=sys.version.split()[0]),
        dev_history=facts["dev_history"],
    )
    report_path.parent.mkdir(parents=True, exist_ok=True)
    report_path.write_text(json.dumps(report, indent=2) + "\n")
    log.info(
        "test WER %.4f CER %.4f | parameters %d | steps %d in %.0f s | %.2f h of audio | report %s",
        report["test_wer"],
        report["test_cer"],
        params,
        facts["steps"],
        facts["train_seconds"],
        train_hours,
        report_path,
    )
    return report


if __name__ == "__main__":
    main()
