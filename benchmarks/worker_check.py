"""What a worker does with an int8 artifact, on a CPU that has no NeMo: torch only, as the job's workers run.

    # on the driver's machine (NeMo): quantize as a job does, save the bytes and 10 s test features
    .venv/bin/python benchmarks/worker_check.py save DIR [--arch quartznet citrinet fastconformer] [--medium]
    # on the other CPU (torch, rapidfuzz and this checkout; `pip install` or gcc builds the kernel)
    python benchmarks/worker_check.py run DIR [--emulate-avx2] [--threads 2] [--rounds 7]

`save` builds each architecture with random weights and randomized BN (as `cpu_kinds.py` does), quantizes it
as a job does (`quantize_model`, histogram observer, the gate), and writes `<arch>.int8` (the artifact's
bytes, what the driver broadcasts), and `<arch>-test.pt`: the log-mel features of 8 espeak-ng clips of 10 s
and the fp32 model's logits on them.

`run` is the worker's side: `build_int8_model(bytes, "auto")` picks the engine and activation width for this
CPU and runs the self-check against the artifact's fp32 reference; then the int8 model's logit cosine and
argmax agreement against the saved fp32 logits on the 8 test clips, and x real time at batch 1 and 8
(encoder + decoder). `--emulate-avx2` caps oneDNN at AVX2 and overrides the int8 flags to `avx2 fma`
(7-bit activations and the AVX2 depthwise kernel, as on an AVX2-only CPU; set before torch loads) and times
the conv family with our depthwise kernel against the engine's.

Statistic, fixed before the runs: the median of `--rounds` rounds (the variants alternating within each
round, after one warm-up call), min and max beside it.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from emulation import emulate_avx2, with_engine_depthwise, write_results  # noqa: E402

EMULATE = "--emulate-avx2" in sys.argv
MODE = emulate_avx2() if EMULATE else "native"  # before torch loads oneDNN

import torch  # noqa: E402
from alternate import alternated, figure  # noqa: E402

from runner.int8 import depthwise  # noqa: E402
from runner.int8.artifact import build_int8_model  # noqa: E402
from runner.sysinfo import cpu_info, cpu_label, int8_flags  # noqa: E402

BATCHES = (1, 8)


def save(out: Path, archs: list[str], medium: bool) -> None:
    from cpu_kinds import build_nemo, features
    from lean_model import ten_second_utterances

    from runner.int8.config import Settings
    from runner.int8.pipeline import quantize_model
    from runner.model.ctc import build_model
    from runner.model.nemo_loader import describe, quiet_nemo_logging
    from runner.training.corpus import sentences, synthesize_many

    quiet_nemo_logging()
    out.mkdir(parents=True, exist_ok=True)
    clips = ten_second_utterances(8)
    calibration = [a for _t, _v, a in synthesize_many(sentences(32, seed=9), seed=9)]
    gate = [a for _t, _v, a in synthesize_many(sentences(16, seed=3), seed=3)]
    for arch in archs:
        lean = build_model(*describe(build_nemo(arch, quick=medium))).eval()
        settings = Settings(max_wer_increase=1.0, observers=("histogram",))  # random weights: gate reported
        t0 = time.perf_counter()
        data = quantize_model(lean, calibration, gate, None, settings).to_bytes()
        print(f"{arch}: quantized in {time.perf_counter() - t0:.1f} s, {len(data) / 1e6:.1f} MB", flush=True)
        feats = torch.stack(features(lean, clips))
        lens = torch.full((len(clips),), feats.shape[-1])
        with torch.inference_mode():
            logits, logit_lens = lean.logits(feats, lens)
        (out / f"{arch}.int8").write_bytes(data)
        torch.save({"feats": feats, "lens": lens, "logits": logits, "logit_lens": logit_lens}, out / f"{arch}-test.pt")


@torch.inference_mode()
def accuracy(model, test: dict) -> dict:
    logits, _ = model.logits(test["feats"], test["lens"])
    ref, n = test["logits"], test["logit_lens"]
    valid = torch.arange(ref.shape[-1]).unsqueeze(0) < n.unsqueeze(1)
    cos = torch.nn.functional.cosine_similarity(logits, ref, dim=1)[valid]
    agree = (logits.argmax(1) == ref.argmax(1))[valid].float()
    return {"logit_cosine": round(float(cos.mean()), 6), "frame_agreement": round(float(agree.mean()), 4)}


def run(folder: Path, rounds: int) -> dict:
    cpu = cpu_info()
    print(f"CPU {cpu_label(cpu)}; flags {' '.join(cpu['flags'])}", flush=True)
    print(
        f"{MODE}; int8 flags read: {' '.join(int8_flags())}; torch {torch.__version__}, {torch.get_num_threads()} "
        f"threads; AVX2 depthwise kernel applies: {depthwise.applies('onednn')}",
        flush=True,
    )
    report = {
        "cpu": cpu,
        "mode": MODE,
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "rounds": rounds,
        "statistic": "median of alternated rounds (min-max)",
        "archs": {},
    }
    artifacts = sorted(folder.glob("*.int8"))
    if not artifacts:
        sys.exit(f"{folder}: no <arch>.int8 artifacts; make them with `worker_check.py save {folder}` where NeMo is")
    for path in artifacts:
        arch, data = path.stem, path.read_bytes()
        if not (folder / f"{arch}-test.pt").is_file():
            sys.exit(f"{folder / (arch + '-test.pt')}: missing; `save` writes it beside {path.name}")
        test = torch.load(folder / f"{arch}-test.pt")
        t0 = time.perf_counter()
        loaded = build_int8_model(data, "auto")
        built = {"runner int8": loaded}
        row = {
            "load_seconds": round(time.perf_counter() - t0, 2),
            "engine": loaded.engine,
            "int8_check": loaded.int8_check,
            "systems": {},
        }
        if EMULATE and "depthwise_convs" in loaded.int8_check and depthwise.applies(loaded.engine):
            built["engine's depthwise"] = with_engine_depthwise(data, loaded.engine)
        check = loaded.int8_check
        print(
            f"{arch}: {loaded.engine}, {check['activation_bits']}-bit activations, "
            + (f"depthwise {check['depthwise_convs']}" if "depthwise_convs" in check else "")
            + (f"attention matmuls {check['attention_matmuls']}" if "attention_matmuls" in check else "")
            + f"; probe {loaded.engine_seconds}; self-check cosine {check['logit_cosine']:.5f}, frames "
            f"{check['frame_agreement']:.3f}, passed {check['passed']}; built in {row['load_seconds']} s",
            flush=True,
        )
        for name, m in built.items():
            row["systems"][name] = {"accuracy_vs_fp32": accuracy(m.model, test)}
        for batch in BATCHES:
            f, n = test["feats"][:batch], test["lens"][:batch]
            with torch.inference_mode():
                t = alternated({name: lambda m=m, f=f, n=n: m.model.logits(f, n) for name, m in built.items()}, rounds)
            for name in built:
                row["systems"][name][f"batch_{batch}_x_real_time"] = figure([10 * batch / s for s in t[name]], digits=2)
        for name, s in row["systems"].items():
            print(
                f"  {name}: x real time batch 1 {s['batch_1_x_real_time']}, batch 8 {s['batch_8_x_real_time']}; "
                f"vs fp32 {s['accuracy_vs_fp32']}",
                flush=True,
            )
        report["archs"][arch] = row
    return report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("what", choices=("save", "run"))
    parser.add_argument("folder", type=Path)
    parser.add_argument(
        "--arch", nargs="+", default=["quartznet", "citrinet"], choices=("quartznet", "citrinet", "fastconformer")
    )
    parser.add_argument(
        "--medium", action="store_true", help="save: FastConformer-CTC medium, not large (a smaller artifact)"
    )
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--emulate-avx2", action="store_true")
    parser.add_argument("--out", type=Path, default=None, help="where run writes its JSON")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.what == "save":
        save(args.folder, args.arch, args.medium)
        return
    report = run(args.folder, args.rounds)
    write_results("worker_check", report, EMULATE, args.out)


if __name__ == "__main__":
    main()
