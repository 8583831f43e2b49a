"""Word times and confidence on the demo model and its held-out set: NeMo parity, int8 vs fp32, usefulness.

    .venv/bin/python benchmarks/words_parity.py [--out benchmarks/results]

1. NeMo parity (fp32): NeMo 3.0's `transcribe(timestamps=True)` of the bundled demo model with its
   confidence (NeMo's defaults, and max_prob with mean aggregation) against the lean model's words on
   the demo's 125 held-out files: word lists, start/end frames, largest confidence difference.
2. int8 vs fp32 and usefulness: the demo's two jobs (`asr-runner demo`, int8 with an empty cache, then
   fp32), compared by `asr-runner compare`: word times within one output frame, mean start/end and
   confidence differences; per run, how often words under 0.5 confidence are wrong against the
   references, and how often those at or above it are.

The figures are deterministic for a given CPU kind (greedy decoding; one run each); the int8 ones
depend on the int8 kernels, so the CPU and its flags are printed with them.
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


def nemo_parity(methods) -> list[dict]:
    from runner.model.nemo_loader import load_any, quiet_nemo_logging
    from runner.training.nemo_words import compare_with_nemo

    quiet_nemo_logging()
    import nemo.collections.asr as nemo_asr

    model_path = ROOT / "runner/data/demo_quartznet.nemo"
    manifest = ROOT / "manifests/demo/test.jsonl"
    paths = [str(manifest.parent / json.loads(line)["audio_filepath"]) for line in manifest.read_text().splitlines()]
    nemo_model = nemo_asr.models.ASRModel.restore_from(str(model_path), map_location="cpu")
    nemo_model.eval()
    lean = load_any(model_path)
    out = []
    for method in methods:
        figures, _ = compare_with_nemo(nemo_model, lean, paths, method)
        out.append({"method": method.__dict__, "utterances": len(paths), **figures})
    return out


def int8_vs_fp32(tmp: Path) -> dict:
    from runner.cli.demo import run_demo

    os.environ["ASR_RUNNER_CACHE"] = str(tmp / "cache")  # an empty cache: the artifact made in this run
    comparison = run_demo(tmp / "demo")
    return {
        "words": comparison["words"],
        "confidence_check": {"int8": comparison["a"]["confidence_check"], "fp32": comparison["b"]["confidence_check"]},
        "engine": comparison["a"]["engine"],
        "identical_transcripts": comparison["agreement"]["identical"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(ROOT / "benchmarks/results"))
    args = parser.parse_args()

    from runner.model.words import ConfidenceMethod
    from runner.sysinfo import cpu_info, int8_flags

    methods = [ConfidenceMethod(), ConfidenceMethod(method="max_prob", alpha=1.0, aggregation="mean")]
    with tempfile.TemporaryDirectory(prefix="words-parity-") as tmp:
        result = {
            "cpu": {"model": cpu_info()["model"], "int8_flags": int8_flags(), "cores": os.cpu_count()},
            "nemo_parity": nemo_parity(methods),
            "int8_vs_fp32": int8_vs_fp32(Path(tmp)),
        }
    out = Path(args.out) / "words_parity.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    cpu = result["cpu"]
    print(f"CPU: {cpu['model']} ({', '.join(cpu['int8_flags']) or 'no AVX-512/VNNI/AMX'}), {cpu['cores']} cores")
    for p in result["nemo_parity"]:
        m = p["method"]
        print(
            f"NeMo parity, {m['method']}/{m['entropy_type']}/{m['aggregation']}: {p['utterances']} files, "
            f"{p['utterances_differ']} with other words; {p['same_frames']}/{p['words']} words with NeMo's "
            f"start and end frames; largest confidence difference {p['max_confidence_diff']:.2e}"
        )
    w, c = result["int8_vs_fp32"]["words"], result["int8_vs_fp32"]["confidence_check"]
    print(
        f"int8 ({result['int8_vs_fp32']['engine']}) vs fp32: {w['within_one_frame']:.2%} of {w['matched_words']} "
        f"words within one frame; mean |start| {1000 * w['mean_abs_start_diff']:.2f} ms, |end| "
        f"{1000 * w['mean_abs_end_diff']:.2f} ms, |confidence| {w['mean_abs_confidence_diff']:.4f}"
    )
    for run in ("int8", "fp32"):
        k = c[run]
        ratio = "inf (none wrong above)" if k["ratio"] is None and k["wrong_below"] else k["ratio"]
        print(
            f"{run}: words under 0.5 wrong {k['wrong_below']:.2%} of {k['low_words']}, at or above "
            f"{k['wrong_at_or_above']:.2%} of {k['high_words']}; ratio {ratio}"
        )
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
