"""Citrinet-256 on CPU: NeMo fp32 vs the lean fp32 model vs int8 (the job's own artifact path).

    .venv/bin/python benchmarks/citrinet.py [--threads 2] [--utterances 16] [--quick] [--out benchmarks/results]

Prints figures and writes JSON; not a test. The model is NeMo's Citrinet-256 layout (23 blocks with
squeeze-excite, 8x stride, a SentencePiece tokenizer trained here) with random weights and
randomized BN statistics. int8 goes the way a job does: `quantize_model` (calibration on real
espeak-ng speech, the accuracy gate in "agreement with fp32" mode) -> artifact bytes ->
`build_int8_model` on the engine `auto` picks. Throughput is RTFx = audio seconds / seconds of
features + encoder + greedy decoding (NeMo: its forward, i.e. what `transcribe()` runs before
decoding), 10 s utterances, batch 1 and 8, interleaved best-of-3 rounds. `--quick`: 4 utterances,
batch 8 only, one observer (a smoke run; the figures to quote come from a full run on a quiet machine).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from lean_model import rtfx_pair, ten_second_utterances  # noqa: E402

from runner.int8.artifact import build_int8_model  # noqa: E402
from runner.int8.config import Settings  # noqa: E402
from runner.int8.pipeline import quantize_model
from runner.model.ctc import build_model  # noqa: E402
from runner.model.nemo_loader import describe, quiet_nemo_logging  # noqa: E402
from runner.model.transcribe import DecodeOptions, pad_batch, transcribe_batch  # noqa: E402
from runner.sysinfo import cpu_info  # noqa: E402
from runner.training.corpus import sentences, synthesize_many  # noqa: E402
from runner.training.recipes import build_nemo_model, citrinet_256_config, randomize_batchnorm, train_tokenizer  # noqa: E402


def make_models(quick: bool):
    """NeMo Citrinet-256 (random weights), its lean model, and the int8 model a worker would build."""
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer = train_tokenizer(sentences(2000, seed=1), tmp, vocab_size=256)
        torch.manual_seed(0)
        nemo = build_nemo_model(citrinet_256_config(tokenizer))
    randomize_batchnorm(nemo)
    lean = build_model(*describe(nemo))
    calibration = [a for _t, _v, a in synthesize_many(sentences(8 if quick else 32, seed=9), seed=9)]
    gate = [a for _t, _v, a in synthesize_many(sentences(4 if quick else 16, seed=3), seed=3)]
    settings = Settings(
        observers=("histogram",) if quick else Settings().observers, max_wer_increase=1.0, max_fp32_layers=0
    )  # random weights: the gate's figures are reported, not enforced
    t0 = time.perf_counter()
    art = quantize_model(lean, calibration, gate, None, settings)
    quantize_seconds = time.perf_counter() - t0
    loaded = build_int8_model(art.to_bytes(), "auto")
    return nemo, lean, loaded, art, quantize_seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--utterances", type=int, default=16)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--out", default="benchmarks/results")
    args = parser.parse_args()
    quiet_nemo_logging()
    torch.set_num_threads(args.threads)
    nemo, lean, loaded, art, quantize_seconds = make_models(args.quick)
    clips = ten_second_utterances(4 if args.quick else args.utterances)
    batches = (8,) if args.quick else (1, 8)
    options = DecodeOptions(batch_size=8)

    @torch.inference_mode()
    def nemo_fn(batch):
        audio, lengths = pad_batch(batch)
        return nemo(input_signal=audio, input_signal_length=lengths)[0]

    fns = {
        "nemo_fp32": nemo_fn,
        "lean_fp32": lambda b: transcribe_batch(lean, b, options),
        "int8": lambda b: transcribe_batch(loaded.model, b, options),
    }
    results = {
        "cpu": cpu_info(),
        "torch": torch.__version__,
        "threads": args.threads,
        "quick": args.quick,
        "params": sum(p.numel() for p in lean.parameters()),
        "utterances": len(clips),
        "engine": loaded.engine,
        "probe_seconds": loaded.engine_seconds,
        "quantize_seconds": round(quantize_seconds, 1),
        "gate": art.report["gate"]["int8"],
        "observer": art.report["observer"],
        "rtfx": {},
    }
    for batch in batches:
        results["rtfx"][f"b{batch}"] = rtfx_pair(fns, clips, min(batch, len(clips)), repeats=3, slow_seconds=30.0)

    print(
        f"Citrinet-256 architecture ({results['params'] / 1e6:.1f} M parameters), torch {torch.__version__}, "
        f"{args.threads} threads, {len(clips)} x 10 s utterances; CPU {results['cpu']['model']}"
    )
    print(
        f"int8: engine {loaded.engine} (auto), observer {art.report['observer']}, quantized in "
        f"{quantize_seconds:.0f} s; int8 vs fp32 logit cosine {art.report['gate']['int8']['logit_cosine']:.4f}"
    )
    for batch in batches:
        r = results["rtfx"][f"b{batch}"]
        cells = [f"{k} {v:6.1f}x RT ({v / r['nemo_fp32']:.2f}x NeMo)" for k, v in r.items()]
        print(f"batch {batch}: " + " | ".join(cells))
        results[f"int8_vs_nemo_b{batch}"] = r["int8"] / r["nemo_fp32"]
    Path(args.out).mkdir(parents=True, exist_ok=True)
    out = Path(args.out) / ("citrinet_quick.json" if args.quick else "citrinet.json")
    out.write_text(json.dumps(results, indent=2))
    print(f"wrote {out} (target: int8 >= 4x NeMo fp32)")


if __name__ == "__main__":
    main()
