"""int8 vs fp32 throughput per quantized engine, and what `auto` picks (QuartzNet15x5 architecture).

    .venv/bin/python benchmarks/int8_engines.py [--threads 2] [--utterances 16] [--out benchmarks/results]

Prints figures and writes JSON; not a test. One run, one machine, same 10 s espeak-ng
utterances for every configuration, batch 1 and 8: NeMo fp32 (its own forward), the lean fp32
model, the int8 model rebuilt from one engine-neutral artifact on each engine this torch has,
and the engine `auto` picks (timed the way a worker does at start-up). Throughput is RTFx =
audio seconds / seconds of features + encoder + greedy decoding (NeMo: its forward only).
Configurations are timed interleaved (best of 3 rounds; one over 8 s per round: once) so machine
noise hits them alike. Weights are random (BN statistics randomized); calibration uses real speech.
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
from runner.int8.engines import available_engines  # noqa: E402
from runner.int8.pipeline import quantize_model
from runner.model.ctc import build_model  # noqa: E402
from runner.model.nemo_loader import describe, quiet_nemo_logging  # noqa: E402
from runner.model.transcribe import DecodeOptions, pad_batch, transcribe_batch  # noqa: E402
from runner.sysinfo import cpu_info  # noqa: E402
from runner.training.corpus import sentences, synthesize_many  # noqa: E402
from runner.training.recipes import build_nemo_model, quartznet15x5_config, randomize_batchnorm  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--utterances", type=int, default=16)
    parser.add_argument("--out", default="benchmarks/results")
    args = parser.parse_args()
    quiet_nemo_logging()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    nemo = build_nemo_model(quartznet15x5_config())
    randomize_batchnorm(nemo)
    spec, state = describe(nemo)
    lean = build_model(spec, state)
    calibration = [a for _t, _v, a in synthesize_many(sentences(24, seed=9), seed=9)]
    # The job's own path (one observer, no gate tolerance: random weights make transcripts noise), so the
    # artifact carries the self-check reference every worker checks itself against.
    art = quantize_model(
        lean,
        calibration[:16],
        calibration[16:],
        None,
        Settings(observers=("histogram",), max_wer_increase=1.0, max_fp32_layers=0, engine="onednn"),
    )
    data = art.to_bytes()

    t0 = time.perf_counter()
    auto = build_int8_model(data, "auto")
    auto_seconds = time.perf_counter() - t0
    int8 = {e: build_int8_model(data, e).model for e in available_engines()}
    clips = ten_second_utterances(args.utterances)
    options = DecodeOptions(batch_size=8)

    @torch.inference_mode()
    def nemo_fn(batch):
        audio, lengths = pad_batch(batch)
        return nemo(input_signal=audio, input_signal_length=lengths)[0]

    fns = {"nemo_fp32": nemo_fn, "lean_fp32": lambda b: transcribe_batch(lean, b, options)}
    fns.update({f"int8_{e}": (lambda m: lambda b: transcribe_batch(m, b, options))(m) for e, m in int8.items()})  # noqa: B023 - m is bound by the outer lambda
    results = {
        "cpu": cpu_info(),
        "torch": torch.__version__,
        "threads": args.threads,
        "params": sum(p.numel() for p in lean.parameters()),
        "utterances": len(clips),
        "auto": {
            "engine": auto.engine,
            "probe_seconds": auto.engine_seconds,
            "load_and_probe_seconds": round(auto_seconds, 3),
        },
        "rtfx": {},
    }
    # qnnpack's indirection buffers grow with kernel size x sequence: ~7 GB at batch 1 on 10 s
    # clips for this model, and an allocation failure at batch 8; it is timed at batch 1 only.
    for batch in (1, 8):
        use = {k: f for k, f in fns.items() if not (batch > 1 and k == "int8_qnnpack")}
        results["rtfx"][f"b{batch}"] = rtfx_pair(use, clips, batch, repeats=3, slow_seconds=8.0)

    print(
        f"QuartzNet15x5 architecture ({results['params'] / 1e6:.1f} M parameters), torch {torch.__version__}, "
        f"{args.threads} threads, {len(clips)} x 10 s utterances; CPU {results['cpu']['model']} "
        f"({', '.join(results['cpu']['flags'])})"
    )
    print(
        f"auto: picked {auto.engine} in {auto_seconds:.2f} s (build + probe); probe speed: "
        + ", ".join(f"{e} {1 / s:.0f}x RT" for e, s in sorted(auto.engine_seconds.items(), key=lambda kv: kv[1]))
    )
    header = f"{'':16}" + "".join(f"{'batch ' + str(b):>22}" for b in (1, 8))
    print(header)
    for name in fns:
        cells = []
        for b in (1, 8):
            r = results["rtfx"][f"b{b}"]
            cells.append(
                f"{r[name]:8.1f}x RT {r[name] / r['nemo_fp32']:6.2f}x NeMo" if name in r else "skipped (memory)"
            )
        print(f"{name:16}" + "".join(f"{c:>22}" for c in cells))
    for b in (1, 8):
        r = results["rtfx"][f"b{b}"]
        engines = {e: r[f"int8_{e}"] for e in int8 if f"int8_{e}" in r}
        fastest = max(engines, key=engines.get)
        picked = engines[auto.engine]
        results[f"auto_b{b}"] = {
            "engine": auto.engine,
            "rtfx": picked,
            "vs_nemo": picked / r["nemo_fp32"],
            "fastest": fastest,
            "behind_fastest": 1 - picked / engines[fastest],
        }
        print(
            f"batch {b}: auto ({auto.engine}) {picked:.1f}x RT = {picked / r['nemo_fp32']:.2f}x NeMo fp32 "
            f"(target >= 6x); fastest engine {fastest}; auto behind it by "
            f"{100 * (1 - picked / engines[fastest]):.1f}% (target <= 5%)"
        )
    Path(args.out).mkdir(parents=True, exist_ok=True)
    out = Path(args.out) / "int8_engines.json"
    out.write_text(json.dumps(results, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
