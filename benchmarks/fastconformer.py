"""NeMo fp32 vs lean fp32 vs int8 (the job's artifact path) on a real-size FastConformer-CTC.

    .venv/bin/python benchmarks/fastconformer.py [--size large|medium|small] [--threads 2]
        [--utterances 8] [--quick] [--out benchmarks/results]

Prints figures and writes JSON; not a test. NeMo's FastConformer-CTC architecture (example config
sizes; character vocabulary) with random weights and randomized BN statistics. The int8 model
is what a worker runs: an artifact made by `runner.int8.pipeline.quantize_model` (the gate checks
agreement with fp32 on held-out espeak-ng speech), rebuilt from bytes on each engine and on the
engine `auto` picks. RTFx = audio seconds / seconds of features + encoder + greedy decoding
(NeMo: its forward only), best of 3 interleaved rounds, batch 1 and 8, on 10 s utterances.
`--quick`: medium size, 2 utterances, batch 1 only (a smoke run, not figures to quote).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from lean_model import rtfx_pair, ten_second_utterances  # noqa: E402

from runner.int8.artifact import build_int8_model  # noqa: E402
from runner.int8.config import Settings  # noqa: E402
from runner.int8.engines import candidate_engines  # noqa: E402
from runner.int8.pipeline import quantize_model
from runner.model.ctc import build_model  # noqa: E402
from runner.model.nemo_loader import describe, quiet_nemo_logging  # noqa: E402
from runner.model.transcribe import DecodeOptions, pad_batch, transcribe_batch  # noqa: E402
from runner.sysinfo import cpu_info  # noqa: E402
from runner.training.corpus import sentences, synthesize_many  # noqa: E402
from runner.training.recipes import build_nemo_model, fastconformer_ctc_config, randomize_batchnorm  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", default="large", choices=("small", "medium", "large"))
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--utterances", type=int, default=8)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--out", default="benchmarks/results")
    args = parser.parse_args()
    if args.quick:
        args.size, args.utterances = "medium", 2
    quiet_nemo_logging()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    nemo = build_nemo_model(fastconformer_ctc_config(args.size))
    randomize_batchnorm(nemo)
    spec, state = describe(nemo)
    lean = build_model(spec, state)
    speech = [a for _t, _v, a in synthesize_many(sentences(16, seed=9), seed=9)]
    t0 = time.perf_counter()
    # Random weights transcribe nothing useful: the gate compares int8 with fp32 logits/transcripts only.
    art = quantize_model(lean, speech[:8], speech[8:], None, Settings(max_wer_increase=1.0, max_fp32_layers=0))
    quantize_seconds = time.perf_counter() - t0
    data = art.to_bytes()
    t0 = time.perf_counter()
    auto = build_int8_model(data, "auto")
    auto_seconds = time.perf_counter() - t0
    int8 = {e: build_int8_model(data, e).model for e in candidate_engines()}
    clips = ten_second_utterances(args.utterances)
    parity = max_log_prob_diff(nemo, lean, clips)
    print(f"lean fp32 vs NeMo at this size: max |log-prob difference| {parity:.2e} (mixed lengths, valid frames)")
    options = DecodeOptions(batch_size=8)

    @torch.inference_mode()
    def nemo_fn(batch):
        audio, lengths = pad_batch(batch)
        return nemo(input_signal=audio, input_signal_length=lengths)[0]

    fns = {"nemo_fp32": nemo_fn, "lean_fp32": lambda b: transcribe_batch(lean, b, options)}
    fns.update({f"int8_{e}": (lambda m: lambda b: transcribe_batch(m, b, options))(m) for e, m in int8.items()})  # noqa: B023 - m is bound by the outer lambda
    batches = (1,) if args.quick else (1, 8)
    results = {
        "model": f"FastConformer-CTC {args.size} (random weights)",
        "cpu": cpu_info(),
        "torch": torch.__version__,
        "threads": args.threads,
        "quick": args.quick,
        "params": sum(p.numel() for p in lean.parameters()),
        "utterances": len(clips),
        "lean_vs_nemo_max_log_prob_diff": parity,
        "artifact": {
            "mb": round(len(data) / 1e6, 1),
            "quantize_seconds": round(quantize_seconds, 1),
            "recipe": art.recipe,
            "gate_int8": art.report["gate"]["int8"],
        },
        "auto": {
            "engine": auto.engine,
            "probe_seconds": auto.engine_seconds,
            "load_and_probe_seconds": round(auto_seconds, 3),
        },
        "rtfx": {f"b{b}": rtfx_pair(fns, clips, b, repeats=3) for b in batches},
    }
    report(results, list(fns), batches)
    Path(args.out).mkdir(parents=True, exist_ok=True)
    out = Path(args.out) / f"fastconformer{'_quick' if args.quick else ''}.json"
    out.write_text(json.dumps(results, indent=2))
    print(f"wrote {out}")


@torch.inference_mode()
def max_log_prob_diff(nemo, lean, clips) -> float:
    """Max |NeMo - lean| log-probability over valid frames, one batch of the clips cut to mixed lengths."""
    audio, lengths = pad_batch([c[: len(c) * (4 + i % 8) // 12] for i, c in enumerate(clips)])
    ref, ref_len, _ = nemo(input_signal=audio, input_signal_length=lengths)
    got, got_len = lean(audio, lengths)
    assert torch.equal(ref_len, got_len), (ref_len, got_len)
    return max((ref[i, :n] - got[i, :n]).abs().max().item() for i, n in enumerate(got_len.tolist()))


def report(results: dict, names: list[str], batches: tuple[int, ...]) -> None:
    print(
        f"{results['model']}: {results['params'] / 1e6:.1f} M parameters, torch {results['torch']}, "
        f"{results['threads']} threads, {results['utterances']} x 10 s utterances; CPU {results['cpu']['model']}"
    )
    print(
        f"artifact {results['artifact']['mb']} MB, made in {results['artifact']['quantize_seconds']} s; "
        f"gate (int8 vs fp32): {results['artifact']['gate_int8']}"
    )
    print(f"auto picked {results['auto']['engine']} (probe s per audio s: {results['auto']['probe_seconds']})")
    print(f"{'':16}" + "".join(f"{'batch ' + str(b):>26}" for b in batches))
    for name in names:
        cells = []
        for b in batches:
            r = results["rtfx"][f"b{b}"]
            cells.append(f"{r[name]:8.1f}x RT {r[name] / r['nemo_fp32']:6.2f}x NeMo")
        print(f"{name:16}" + "".join(f"{c:>26}" for c in cells))
    for b in batches:
        r = results["rtfx"][f"b{b}"]
        picked = r[f"int8_{results['auto']['engine']}"]
        results[f"auto_b{b}"] = {
            "rtfx": picked,
            "vs_nemo": picked / r["nemo_fp32"],
            "vs_lean_fp32": picked / r["lean_fp32"],
        }
        print(
            f"batch {b}: int8 ({results['auto']['engine']}) = {picked / r['nemo_fp32']:.2f}x NeMo fp32 "
            f"(target >= 2x), {picked / r['lean_fp32']:.2f}x lean fp32"
        )


if __name__ == "__main__":
    main()
