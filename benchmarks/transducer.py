"""Transducers: NeMo fp32 vs the lean fp32 model vs the runner's int8, with the greedy decoding timed apart.

    .venv/bin/python benchmarks/transducer.py [--size 0.6b|small|tiny] [--threads 2] [--rounds 5]
        [--utterances 8] [--out benchmarks/results]

Prints figures and writes JSON; not a test. The model is NeMo's Parakeet-TDT architecture
(`runner.training.transducers.parakeet_tdt_config`: FastConformer encoder, 2-layer LSTM prediction
network, TDT joint with durations 0-4, 1024 SentencePiece pieces) with random weights, randomized BN
statistics and a joint set up to emit blanks and labels as a trained one does (`randomize_transducer`;
the labels emitted per clip are printed: the decoding's work grows with them). The int8 model is what a
job's worker runs: an artifact from `runner.int8.pipeline.quantize_model`, rebuilt from its bytes on the
engine the gate used.

Each system transcribes `--utterances` clips of 10 s of espeak-ng speech, batch 1 and 8, 2 threads:
- NeMo fp32: its preprocessor + encoder, then its own greedy_batch decoding (label looping), which
  is what `transcribe()` runs per batch;
- lean fp32 and runner int8: `transcribe_batch` (features, encoder, greedy decoding).
Statistic, fixed before the run: the median over `--rounds` interleaved rounds (all systems each round),
with min and max, of x real time (audio seconds / seconds). The decoding share is the median over rounds of
(prediction + joint + loop seconds) / (whole transcription seconds) for the same system in the same round.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from lean_model import ten_second_utterances  # noqa: E402

from runner.int8.artifact import build_int8_model  # noqa: E402
from runner.int8.config import Settings  # noqa: E402
from runner.int8.pipeline import quantize_model  # noqa: E402
from runner.model.ctc import build_model  # noqa: E402
from runner.model.nemo_loader import load_nemo, quiet_nemo_logging  # noqa: E402
from runner.model.transcribe import DecodeOptions, pad_batch, transcribe_batch  # noqa: E402
from runner.sysinfo import cpu_info, cpu_tag  # noqa: E402
from runner.training.corpus import sentences, synthesize_many  # noqa: E402


def build(size: str, folder: Path):
    """The NeMo model (random weights, randomized BN) and its `.nemo` file."""
    from runner.training.recipes import train_tokenizer
    from runner.training.transducers import build_transducer, randomize_transducer, transducer_config

    torch.manual_seed(0)
    if size == "tiny":
        config = transducer_config("tdt")
    else:
        from runner.training.transducers import parakeet_tdt_config

        pieces = 1024
        tok = train_tokenizer(tokenizer_texts(), folder / "tokenizer", vocab_size=pieces)
        config = parakeet_tdt_config(tok, size=size)
    nemo = build_transducer(config)
    randomize_transducer(nemo)  # random BN statistics, and a joint that emits like a trained one (blanks and labels)
    path = folder / f"transducer-{size}.nemo"
    nemo.save_to(str(path))
    return nemo, path


def tokenizer_texts() -> list[str]:
    """Text for a full 1024-piece BPE tokenizer: the espeak-ng sentences (~860 words, too few pieces alone)
    and seeded pseudo-words, so the joint has Parakeet's 1025 classes + 5 durations."""
    import random

    rng = random.Random(5)
    letters = "etaoinshrdlcumwfgypbvkjxqz"
    weights = [26 - i for i in range(26)]
    words = ["".join(rng.choices(letters, weights, k=rng.randint(2, 9))) for _ in range(40000)]
    return sentences(5000, seed=5) + [" ".join(words[i : i + 12]) for i in range(0, len(words), 12)]


@torch.inference_mode()
def nemo_transcribe(nemo, clips, timings: dict) -> None:
    audio, lengths = pad_batch(clips)
    t0 = time.perf_counter()
    feats, frames = nemo.preprocessor(input_signal=audio, length=lengths)
    enc, enc_len = nemo.encoder(audio_signal=feats, length=frames)
    t1 = time.perf_counter()
    nemo.decoding.rnnt_decoder_predictions_tensor(encoder_output=enc, encoded_lengths=enc_len)
    timings["decode"] = timings.get("decode", 0.0) + time.perf_counter() - t1
    timings["encoder"] = timings.get("encoder", 0.0) + t1 - t0


def runner_transcribe(model, clips, timings: dict) -> None:
    transcribe_batch(model, clips, DecodeOptions(batch_size=len(clips)), timings)


def measure(systems: dict, clips, batch: int, rounds: int) -> dict:
    """x real time and decoding share per system: median, min, max over interleaved rounds."""
    for fn in systems.values():
        fn(clips[:batch], {})  # warm-up: weight packing, first-call set-up
    rtfx = {name: [] for name in systems}
    share = {name: [] for name in systems}
    for _ in range(rounds):
        for name, fn in systems.items():
            timings: dict = {}
            t0 = time.perf_counter()
            for i in range(0, len(clips), batch):
                fn(clips[i : i + batch], timings)
            seconds = time.perf_counter() - t0
            rtfx[name].append(len(clips) * 10.0 / seconds)
            share[name].append(timings.get("decode", 0.0) / seconds)
    return {name: {"rtfx": stat(rtfx[name]), "decode_share": stat(share[name])} for name in systems}


@torch.inference_mode()
def emitted_tokens(model, clips) -> float:
    """Mean labels the greedy decoding emits per clip (a trained Parakeet emits ~30-40 per 10 s of speech)."""
    frames, lens = model(*pad_batch(clips))
    return sum(len(t) for t in model.head.greedy(frames, lens).tokens) / len(clips)


def stat(values: list[float]) -> dict:
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "n": len(values)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", default="0.6b", choices=("0.6b", "small", "tiny"))
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--utterances", type=int, default=8)
    parser.add_argument("--out", default="benchmarks/results")
    args = parser.parse_args()
    quiet_nemo_logging()
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        nemo, path = build(args.size, Path(tmp))
        spec, state = load_nemo(path)
    lean = build_model(spec, state)
    speech = [a for _t, _v, a in synthesize_many(sentences(16, seed=9), seed=9)]
    t0 = time.perf_counter()
    # Random weights transcribe nothing useful, and their joint's choices are near-ties that int8 rounding
    # flips (int8 vs fp32 "WER" ~100%): the gate must not stop a speed benchmark. Accuracy is the tests'
    # (the trained RNN-T: int8 vs fp32 WER 0.7%).
    art = quantize_model(lean, speech[:8], speech[8:], None, Settings(max_wer_increase=100.0, max_fp32_layers=0))
    quantize_seconds = time.perf_counter() - t0
    # The gate's engine: with random weights the joint's ~1000 classes are near-ties, and another engine's
    # rounding moves the best class of a few % of frames, enough for the self-check to send `auto`'s pick
    # (x86 or fbgemm here) back to fp32; a trained model's margins do not (the tests' job passes it).
    int8 = build_int8_model(art.to_bytes(), art.report["engine"])
    clips = ten_second_utterances(args.utterances)
    systems = {
        "nemo_fp32": lambda b, t: nemo_transcribe(nemo, b, t),
        "lean_fp32": lambda b, t: runner_transcribe(lean, b, t),
        "runner_int8": lambda b, t: runner_transcribe(int8.model, b, t),
    }
    same = [transcribe_batch(lean, [c]) == [nemo.transcribe([c], verbose=False)[0].text] for c in clips[:2]]
    tokens = emitted_tokens(lean, clips)
    results = {
        "model": f"Parakeet-TDT {args.size} architecture (random weights)",
        "cpu": cpu_info(),
        "torch": torch.__version__,
        "threads": args.threads,
        "params": sum(p.numel() for p in lean.parameters()),
        "vocabulary": len(spec.vocabulary),
        "utterances": len(clips),
        "lean_text_equals_nemo_transcribe": same,
        "tokens_per_clip": tokens,  # the decoding's work: labels emitted per 10 s clip (fp32)
        "artifact": {
            "mb": round(len(art.to_bytes()) / 1e6, 1),
            "quantize_seconds": round(quantize_seconds, 1),
            "engine": int8.engine,
            "gate_int8": art.report["gate"]["int8"],
        },
        "statistic": f"median of {args.rounds} interleaved rounds, with min and max",
        "batches": {f"b{b}": measure(systems, clips, b, args.rounds) for b in (1, 8)},
    }
    report(results)
    Path(args.out).mkdir(parents=True, exist_ok=True)
    out = Path(args.out) / f"transducer-{args.size}-{cpu_tag()}.json"
    out.write_text(json.dumps(results, indent=2))
    print(f"wrote {out}")


def report(results: dict) -> None:
    cpu = results["cpu"]
    print(
        f"{results['model']}: {results['params'] / 1e6:.1f} M parameters, {results['vocabulary']} pieces, "
        f"torch {results['torch']}, "
        f"{results['threads']} threads, {results['utterances']} x 10 s; CPU {cpu.get('model')} "
        f"flags {' '.join(cpu.get('flags', []))}"
    )
    print(f"lean transcript == NeMo transcribe(): {results['lean_text_equals_nemo_transcribe']}")
    print(f"labels emitted per 10 s clip: {results['tokens_per_clip']:.1f}")
    a = results["artifact"]
    print(f"int8 artifact {a['mb']} MB, quantized in {a['quantize_seconds']} s, engine {a['engine']}")
    print(f"gate, int8 vs fp32: {a['gate_int8']}")
    print(results["statistic"])
    for b, rows in results["batches"].items():
        base = rows["nemo_fp32"]["rtfx"]["median"]
        for name, r in rows.items():
            x, d = r["rtfx"], r["decode_share"]
            print(
                f"  {b} {name:12} {x['median']:7.1f}x real time ({x['min']:.1f}-{x['max']:.1f})"
                f"  {x['median'] / base:5.2f}x NeMo fp32  decoding {100 * d['median']:4.1f}% of the time"
            )


if __name__ == "__main__":
    main()
