"""End to end: the same manifest as an fp32 job and as an int8 job (`asr-runner run`), one machine.

    .venv/bin/python benchmarks/int8_job.py [--model runner/data/demo_quartznet.nemo]
        [--manifest manifests/demo/test.jsonl] [--repeat 6] [--workers 2] [--out benchmarks/results]

Prints figures and writes JSON; not a test. The manifest is repeated `--repeat` times (new ids)
so each job runs long enough to measure. Both jobs use local Ray, one single-thread worker per
CPU; the int8 job calibrates and gates first (its own cache folder, so this is a cold start).
RTFx is the runner's own: audio seconds / (first shard dispatched -> last part written).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from repeat_manifest import repeated_manifest  # noqa: E402

from runner.job.run import run_job  # noqa: E402
from runner.job.spec import JobSpec  # noqa: E402
from runner.model.nemo_loader import quiet_nemo_logging  # noqa: E402


def build_random_quartznet15x5(path: str) -> None:
    import torch

    from runner.training.recipes import build_nemo_model, quartznet15x5_config, randomize_batchnorm

    torch.manual_seed(0)
    model = build_nemo_model(quartznet15x5_config())
    randomize_batchnorm(model)
    model.save_to(path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--model",
        default=str(ROOT / "runner/data/demo_quartznet.nemo"),
        help="a .nemo file, or `quartznet15x5`: NeMo's QuartzNet15x5 architecture with random "
        "weights (BN statistics randomized), built here; its transcripts are noise, so only "
        "its speed means something",
    )
    parser.add_argument("--manifest", default=str(ROOT / "manifests/demo/test.jsonl"))
    parser.add_argument("--repeat", type=int, default=6)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--max-wer-increase", type=float, default=0.005)
    parser.add_argument("--out", default="benchmarks/results")
    args = parser.parse_args()
    quiet_nemo_logging()

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        os.environ["ASR_RUNNER_CACHE"] = str(tmp / "cache")
        if args.model == "quartznet15x5":
            args.model = str(tmp / "quartznet15x5.nemo")
            build_random_quartznet15x5(args.model)
        manifest = tmp / "manifest.jsonl"
        repeated_manifest(Path(args.manifest), args.repeat, manifest)
        stats = {}
        for precision in ("fp32", "int8"):
            spec = JobSpec.from_dict(
                {
                    "model": args.model,
                    "manifest": str(manifest),
                    "output": str(tmp / precision),
                    "precision": precision,
                    "workers": args.workers,
                    "shard_seconds": 120,
                    "quantization": {"max_wer_increase": args.max_wer_increase},
                }
            )
            stats[precision] = run_job(spec).stats
    fp32, int8 = stats["fp32"], stats["int8"]
    ratio = int8["rtfx"] / fp32["rtfx"]
    print(
        f"model {args.model}; {int8['utterances']} utterances, {int8['audio_seconds'] / 3600:.2f} h of audio; "
        f"{args.workers} workers x 1 thread; CPU {int8['cpu']['model']}"
    )
    for name, s in stats.items():
        wer = "-" if s["wer"] is None else f"{100 * s['wer']:.2f}%"
        print(
            f"{name}: RTFx {s['rtfx']:8.1f}  wall {s['wall_seconds']:7.1f} s  startup {s['startup_seconds']:5.1f} s  "
            f"WER {wer}  engine {s['engine']}"
        )
    print(f"int8 job / fp32 job: {ratio:.2f}x (target >= 4x)")
    Path(args.out).mkdir(parents=True, exist_ok=True)
    out = Path(args.out) / f"int8_job_{Path(args.model).stem}.json"
    int8["quantization"] = {k: v for k, v in (int8.get("quantization") or {}).items() if k != "gate"}
    out.write_text(json.dumps({"model": args.model, "repeat": args.repeat, "ratio": ratio, "stats": stats}, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
