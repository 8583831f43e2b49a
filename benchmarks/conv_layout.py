"""The conv family's float path: channels-last (1, K) conv2d vs the Conv1d modules' own forward.

    .venv/bin/python benchmarks/conv_layout.py [--models demo,quartznet15x5,citrinet256] [--rounds 5]
        [--threads 2] [--out benchmarks/results]

The lean fp32 model (features excluded: the encoder and decoder, `model.logits`) on 8 utterances of
the bundled espeak-ng test set (batch 8, mixed lengths), two ways in one process on the same input:
`channels-last`, the runner's path (`runner.model.conv.conv_channels_last`), and `conv1d`, each conv
module called on [B, C, T]-contiguous tensors as before (the same module-level functions replaced by
the module calls, so nothing else differs). The int8 model of the same weights (artifact made with the
default settings, from the cache when present) runs beside them for the ratio a job sees. Statistic,
fixed before the runs: median of `--rounds` alternated rounds, with min and max, in x real time.
Also the largest logit difference between the two float paths. Models with random weights are built
as in `benchmarks/quantize_time.py`.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))


def timed(models: dict, feats, frames, rounds: int, seconds: float) -> tuple[dict, dict]:
    """Each model's logits and x real time per round (round 0 warms up; the order alternates), the float
    path chosen by its key: `conv1d` calls the conv modules themselves."""
    import runner.model.conv as conv_module

    fast = (conv_module.conv_channels_last, conv_module.batch_norm)
    slow = (lambda conv, x: conv(x), lambda bn, x: bn(x))
    outputs, times = {}, {k: [] for k in models}
    try:
        for r in range(rounds + 1):
            for key in models if r % 2 else reversed(list(models)):
                conv_module.conv_channels_last, conv_module.batch_norm = slow if key == "conv1d" else fast
                t0 = time.perf_counter()
                outputs[key] = models[key].logits(feats, frames)
                if r:
                    times[key].append(seconds / (time.perf_counter() - t0))
    finally:
        conv_module.conv_channels_last, conv_module.batch_norm = fast
    return outputs, times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="demo,quartznet15x5,citrinet256")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--models-dir", default=None)
    parser.add_argument("--out", default=str(ROOT / "benchmarks/results"))
    args = parser.parse_args()

    import torch
    from quantize_time import model_inputs

    from runner.inputs.audio import load_audio
    from runner.int8.artifact import build_int8_model
    from runner.int8.config import Settings
    from runner.int8.make import make_artifact
    from runner.model.nemo_loader import load_any
    from runner.model.transcribe import pad_batch
    from runner.sysinfo import cpu_info, int8_flags

    torch.set_num_threads(args.threads)
    items = [json.loads(line) for line in open(ROOT / "manifests/demo/test.jsonl")][:8]
    cpu = {"model": cpu_info()["model"], "int8_flags": int8_flags(), "threads": args.threads}
    results = {"cpu": cpu, "statistic": f"median of {args.rounds} alternated rounds (min-max), x real time"}
    with tempfile.TemporaryDirectory(prefix="conv-layout-") as tmp:
        for name, path, manifest, calibration in model_inputs(args.models.split(","), args.models_dir, tmp):
            model = load_any(str(path), None).eval()
            rate = model.spec.features.sample_rate
            audios = [load_audio(str(ROOT / "manifests/demo" / i["audio_filepath"]), rate) for i in items]
            seconds = sum(len(a) for a in audios) / rate
            made = make_artifact(str(path), str(manifest), calibration or None, Settings())
            int8 = build_int8_model(made.data, "onednn").model
            with torch.inference_mode():
                feats, frames = model.features(*pad_batch(audios))
                outputs, times = timed(
                    {"conv1d": model, "channels-last": model, "int8": int8}, feats, frames, args.rounds, seconds
                )
            (a, lens), (b, _) = outputs["conv1d"], outputs["channels-last"]
            diff = max(float((a[i, :, : lens[i]] - b[i, :, : lens[i]]).abs().max()) for i in range(len(lens)))
            figures = {
                k: {"median": round(statistics.median(v), 1), "min": round(min(v), 1), "max": round(max(v), 1)}
                for k, v in times.items()
            }
            results[name] = {
                "audio_seconds": round(seconds, 1),
                "x_real_time": figures,
                "max_logit_diff": diff,
                "speedup": round(figures["channels-last"]["median"] / figures["conv1d"]["median"], 2),
                "int8_vs_fp32": round(figures["int8"]["median"] / figures["channels-last"]["median"], 2),
            }
            print(
                f"{name}: "
                + ", ".join(f"{k} {f['median']}x ({f['min']}-{f['max']})" for k, f in figures.items())
                + f"; channels-last {results[name]['speedup']}x conv1d, int8 {results[name]['int8_vs_fp32']}x "
                f"fp32; logits within {diff:.1e}",
                flush=True,
            )
    out = Path(args.out) / "conv_layout.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=1))
    print(f"CPU: {cpu['model']}, flags {' '.join(cpu['int8_flags'])}, {args.threads} threads, {os.cpu_count()} cores")
    print(f"written: {out}")


if __name__ == "__main__":
    main()
