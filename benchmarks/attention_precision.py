"""A Conformer's int8 model with its attention matmuls in fp32 and in bf16, same process, interleaved.

    .venv/bin/python benchmarks/attention_precision.py [--size large] [--rounds 7] [--threads 2]

FastConformer-CTC (`--size`, random weights, as cpu_kinds.py builds it) quantized by the runner's
pipeline (histogram observer, gate not enforced) and built as a worker does on onednn; then the same
int8 model runs with every layer's `matmul_dtype` set to fp32 and to bf16, alternating, on the
log-mel features of 8 x 10 s espeak-ng utterances, batch 1 (the first clip) and batch 8.

Statistic, fixed before the runs: per setting and batch size, the median of `--rounds` timed passes
(one untimed pass first), min and max beside it; the speed-up is median(fp32) / median(bf16). Accuracy:
each setting's logit cosine to the lean fp32 model (mean over frames of the per-frame cosine over the
vocabulary) and greedy argmax frame agreement. Where the CPU lacks bf16 in hardware (flags avx512_bf16,
amx_bf16), bf16 is emulated and slower: the runner keeps fp32 there (`engines.attention_dtype`).
Prints the CPU and its flags; writes benchmarks/results/attention_precision-<cpu tag>.json.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from cpu_kinds import build_nemo  # noqa: E402
from lean_model import ten_second_utterances  # noqa: E402

from runner.int8.artifact import build_int8_model  # noqa: E402
from runner.int8.config import Settings  # noqa: E402
from runner.int8.engines import attention_dtype  # noqa: E402
from runner.int8.pipeline import quantize_model  # noqa: E402
from runner.model.ctc import build_model  # noqa: E402
from runner.model.nemo_loader import describe, quiet_nemo_logging  # noqa: E402
from runner.sysinfo import cpu_info, cpu_label, cpu_tag  # noqa: E402
from runner.training.corpus import sentences, synthesize_many  # noqa: E402

SETTINGS = {"fp32": torch.float32, "bf16": torch.bfloat16}


def set_attention(model, dtype: torch.dtype) -> None:
    for layer in model.qencoder.encoder.layers:
        layer.self_attn.matmul_dtype = dtype


def agreement(logits: torch.Tensor, ref: torch.Tensor) -> tuple[float, float]:
    cos = torch.nn.functional.cosine_similarity(logits, ref, dim=1).mean().item()
    return round(cos, 6), round((logits.argmax(1) == ref.argmax(1)).float().mean().item(), 4)


@torch.inference_mode()
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", default="large", choices=("large", "medium"))
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default=str(ROOT / "benchmarks/results"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    quiet_nemo_logging()
    cpu = cpu_info()
    print(f"CPU {cpu_label(cpu)}, flags: {', '.join(cpu['flags'])}; {args.threads} threads", flush=True)
    print(f"the runner's choice on this CPU: {attention_dtype()}", flush=True)
    nemo = build_nemo("fastconformer", quick=args.size == "medium")
    lean = build_model(*describe(nemo)).eval()
    del nemo
    clips = [a for _, _, a in synthesize_many(sentences(24, seed=5), seed=5)]
    settings = Settings(max_wer_increase=1.0, observers=("histogram",), engine="onednn")
    art = quantize_model(lean, clips[:16], clips[16:], None, settings)
    model = build_int8_model(art.to_bytes(), "onednn").model
    audio = torch.from_numpy(__import__("numpy").stack(ten_second_utterances(8)))
    feats, frames = lean.features(audio, torch.full((8,), audio.shape[1]))
    result = {"cpu": cpu, "threads": args.threads, "size": args.size, "rounds": args.rounds, "batches": {}}
    for batch in (1, 8):
        f, n = feats[:batch], frames[:batch]
        ref = lean.logits(f, n)[0]
        seconds = {name: [] for name in SETTINGS}
        accuracy = {}
        for name, dtype in SETTINGS.items():  # untimed pass: kernels set up for this shape
            set_attention(model, dtype)
            accuracy[name] = agreement(model.logits(f, n)[0], ref)
        for r in range(args.rounds):
            for name in SETTINGS if r % 2 == 0 else list(SETTINGS)[::-1]:
                set_attention(model, SETTINGS[name])
                t0 = time.perf_counter()
                model.logits(f, n)
                seconds[name].append(time.perf_counter() - t0)
        row = {}
        for name, s in seconds.items():
            row[name] = {
                "ms": {k: round(1e3 * f(s), 1) for k, f in (("median", statistics.median), ("min", min), ("max", max))},
                "x_real_time": round(10 * batch / statistics.median(s), 1),
                "logit_cosine": accuracy[name][0],
                "frame_agreement": accuracy[name][1],
            }
        row["bf16_speedup"] = round(statistics.median(seconds["fp32"]) / statistics.median(seconds["bf16"]), 3)
        result["batches"][batch] = row
        print(f"batch {batch} (10 s each), ms median [min-max], x real time, logit cosine / argmax frames vs fp32:")
        for name in SETTINGS:
            m = row[name]
            print(
                f"  attention {name}: {m['ms']['median']:.1f} [{m['ms']['min']:.1f}-{m['ms']['max']:.1f}] "
                f"{m['x_real_time']:.1f}x  {m['logit_cosine']:.6f} / {m['frame_agreement']:.2%}"
            )
        print(f"  bf16 speed-up: {row['bf16_speedup']:.3f}x", flush=True)
    out = Path(args.out) / f"attention_precision-{cpu_tag(cpu)}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
