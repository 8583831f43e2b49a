"""int8 on this CPU kind: the runner's int8 next to ONNX Runtime and OpenVINO (NNCF) int8, speed and accuracy.

    .venv/bin/python benchmarks/cpu_kinds.py [--arch quartznet,citrinet,fastconformer] [--rounds 5]
        [--clips 8] [--threads 2] [--quick] [--emulate-avx2] [--out benchmarks/results]

Prints figures and writes JSON (benchmarks/results/cpu_kinds-<cpu model>-<int8 kind>.json, one entry per architecture,
merged into what an earlier run on the same CPU kind wrote); not a test. See DESIGN.md, "CPU kinds":
int8 kernels differ between CPUs with and without VNNI, so every figure here is for the CPU it ran on
(model and SIMD flags printed first). Three architectures with random weights and randomized BN
statistics: QuartzNet15x5 (as vs_peers.py), Citrinet-256 with a SentencePiece tokenizer trained on
generated text (as citrinet.py) and FastConformer-CTC large (as fastconformer.py; medium with --quick).

Systems, all on the same precomputed log-mel features of 10 s espeak-ng utterances (encoder +
decoder only), `--threads` threads each (torch, ORT intra-op, OpenVINO INFERENCE_NUM_THREADS with the
latency hint): NeMo fp32 forward, the lean fp32 model, the runner's int8 as a job runs it
(`quantize_model` -> artifact bytes -> `build_int8_model(..., "auto")`; engine, activation bits and
int8 self-check recorded as the loader reports them), ONNX Runtime fp32 and int8 (static QDQ,
per-channel, peers.onnx_sessions), OpenVINO fp32 (f32 inference precision) and int8 (NNCF
post-training quantization of the same ONNX export, calibrated on the same features).
Speed: x real time (audio seconds / seconds), batch 1 and 8, rounds interleaved (order rotated each
round); the statistic is the median of `--rounds` timed rounds (>= 3), min and max printed beside it.
Accuracy of every system but NeMo against the lean fp32 logits of the same clips: logit cosine (mean
over valid frames of the per-frame cosine over the vocabulary) and greedy argmax frame agreement.
`--quick`: 1 round, 2 clips, small calibration, FastConformer medium (checks the script, not figures).
`--emulate-avx2`, on a CPU with VNNI or AMX: the AVX2-only kind's int8 kernels, as `emulation.py` sets them
(oneDNN and MKL capped at AVX2 for torch and OpenVINO, the runner's int8 flags "avx2 fma", OpenVINO's float
parts in f32 as on a CPU without bf16). ONNX Runtime is not capped: its rows stay this CPU's own kernels.
Which kernels OpenVINO compiled to is recorded (`openvino_kernels`). The cores stay this CPU's: the figures
compare kernels, not an AVX2 machine's speed; the JSON name ends in -emulated-avx2.
`--engine-depthwise`: where the runner's AVX2 depthwise kernel runs, also `runner_int8_engine_dw`, the same
artifact with the engine's own depthwise convs (what the kernel gains).
Needs the `bench` extra (onnxruntime, onnxscript, openvino, nncf).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
import traceback
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from emulation import emulate_avx2, has_vnni, with_engine_depthwise  # noqa: E402

EMULATE = "--emulate-avx2" in sys.argv
MODE = emulate_avx2() if EMULATE else "native"  # before torch or OpenVINO loads oneDNN

import torch  # noqa: E402
from cpu_kinds_report import print_arch  # noqa: E402
from lean_model import ten_second_utterances  # noqa: E402
from peers import exportable_conformer, onnx_sessions, openvino_kernels, openvino_models  # noqa: E402

from runner.int8 import depthwise  # noqa: E402
from runner.int8.artifact import build_int8_model  # noqa: E402
from runner.int8.config import Settings  # noqa: E402
from runner.int8.pipeline import GateFailed, quantize_model  # noqa: E402
from runner.model.ctc import build_model  # noqa: E402
from runner.model.nemo_loader import describe, quiet_nemo_logging  # noqa: E402
from runner.sysinfo import cpu_info, cpu_label, cpu_tag  # noqa: E402
from runner.training.corpus import sentences, synthesize_many  # noqa: E402
from runner.training.recipes import (  # noqa: E402
    build_nemo_model,
    citrinet_256_config,
    fastconformer_ctc_config,
    quartznet15x5_config,
    randomize_batchnorm,
    train_tokenizer,
)

ARCHS = ("quartznet", "citrinet", "fastconformer")
CLIP_SECONDS = 10.0


def build_nemo(arch: str, quick: bool):
    """The NeMo model of `arch` with random weights and randomized BN, built as the arch's own benchmark does."""
    if arch == "citrinet":
        with tempfile.TemporaryDirectory() as tmp:
            tokenizer = train_tokenizer(sentences(2000, seed=1), tmp, vocab_size=256)
            torch.manual_seed(0)
            nemo = build_nemo_model(citrinet_256_config(tokenizer))
    else:
        torch.manual_seed(0)
        config = (
            quartznet15x5_config() if arch == "quartznet" else fastconformer_ctc_config("medium" if quick else "large")
        )
        nemo = build_nemo_model(config)
    randomize_batchnorm(nemo)
    return nemo.eval()


@torch.inference_mode()
def features(lean, clips) -> list[torch.Tensor]:
    """Log-mel features [F, T] of each clip (the lean model's fp32 front end)."""
    return [lean.features(torch.from_numpy(a).unsqueeze(0), torch.tensor([len(a)]))[0][0] for a in clips]


def int8_facts(loaded) -> dict:
    """What the loader says about the int8 model it built: engine, probe timings, and (where this version of
    `build_int8_model` has them) activation bits and its int8 self-check."""
    facts = {"engine": loaded.engine, "probe_seconds": loaded.engine_seconds}
    for owner in (loaded, loaded.model, getattr(loaded.model, "qencoder", None)):
        for name in ("activation_bits", "bits", "int8_check"):
            value = getattr(owner, name, None)
            if value is not None and not callable(value) and name not in facts:
                facts[name] = value
    return facts


def runner_int8(lean, calibration, gate, quick: bool, engine_dw: bool = False) -> tuple[dict, dict]:
    """The int8 model a job's worker runs: calibrated, gated artifact -> bytes -> `build_int8_model(auto)`;
    {system name: model}, with "runner_int8_engine_dw" too where `engine_dw` and the AVX2 kernel ran."""
    settings = Settings(
        max_wer_increase=1.0,  # random weights: the gate's figures are reported, not enforced
        observers=("histogram",) if quick else Settings().observers,
    )
    t0 = time.perf_counter()
    try:
        art = quantize_model(lean, calibration, gate, None, settings)
        made, t0 = time.perf_counter() - t0, time.perf_counter()
        loaded = build_int8_model(art.to_bytes(), "auto")
    except GateFailed as exc:
        return {}, {"error": f"GateFailed: {exc}", "report": exc.report}
    except Exception as exc:  # reported in the table; the peers are still measured
        return {}, {"error": f"{type(exc).__name__}: {exc}", "traceback": traceback.format_exc(limit=-4)}
    models = {"runner_int8": loaded.model}
    if engine_dw and loaded.int8_check.get("depthwise_convs") == depthwise.NAME:
        models["runner_int8_engine_dw"] = with_engine_depthwise(art.to_bytes(), loaded.engine).model
    return models, {
        **int8_facts(loaded),
        "quantize_seconds": round(made, 1),
        "load_seconds": round(time.perf_counter() - t0, 2),
        "float_units": art.float_units,
        "observer": art.report.get("observer"),
        "gate_int8": art.report.get("gate", {}).get("int8"),
    }


def system_fns(nemo, lean, int8: dict, sessions: dict, compiled: dict) -> dict:
    """name -> fn(feats [B, F, T]) -> logits [B, C, T'] (NeMo: log-probabilities [B, T', C])."""

    def lens(x):
        return torch.full((x.shape[0],), x.shape[2], dtype=torch.long)

    @torch.inference_mode()
    def nemo_fn(x):
        enc, _ = nemo.encoder(audio_signal=x, length=lens(x))
        return nemo.decoder(encoder_output=enc)

    def torch_fn(model):
        return torch.inference_mode()(lambda x: model.logits(x, lens(x))[0])

    def ort_fn(session):
        return lambda x: torch.from_numpy(session.run(None, {"feats": x.numpy()})[0])

    def ov_fn(model):
        request = model.create_infer_request()

        def run(x):
            request.infer({0: x.numpy()})
            return torch.from_numpy(request.get_output_tensor(0).data.copy())

        return run

    fns = {"nemo_fp32": nemo_fn, "lean_fp32": torch_fn(lean)}
    fns.update({name: torch_fn(m) for name, m in int8.items()})
    fns.update({name: ort_fn(s) for name, s in sessions.items()})
    fns.update({name: ov_fn(m) for name, m in compiled.items()})
    return fns


def logit_agreement(ref: torch.Tensor, got: torch.Tensor, frames: torch.Tensor) -> dict:
    """Mean per-frame cosine over the vocabulary and argmax agreement of logits [B, C, T] on valid frames."""
    if ref.shape != got.shape:
        return {"error": f"shape {tuple(got.shape)} != reference {tuple(ref.shape)}"}
    valid = torch.arange(ref.shape[2])[None, :] < frames[:, None]
    cosine = torch.nn.functional.cosine_similarity(ref.float(), got.float(), dim=1)[valid]
    same = (ref.argmax(1) == got.argmax(1))[valid]
    return {"logit_cosine": round(cosine.mean().item(), 5), "argmax_agreement": round(same.float().mean().item(), 5)}


def accuracy(fns: dict, batches: list[torch.Tensor], lean) -> dict:
    """Every system's logits (NeMo's are log-probabilities: left out) against the lean fp32 logits."""
    with torch.inference_mode():
        ref = [lean.logits(x, torch.full((x.shape[0],), x.shape[2], dtype=torch.long)) for x in batches]
    logits, frames = torch.cat([r[0] for r in ref]), torch.cat([r[1] for r in ref])
    return {
        name: logit_agreement(logits, torch.cat([fn(x) for x in batches]), frames)
        for name, fn in fns.items()
        if name not in ("nemo_fp32", "lean_fp32")
    }


def time_rounds(fns: dict, batches: list[torch.Tensor], rounds: int) -> dict[str, list[float]]:
    """Seconds per pass over `batches` for each system: one warm-up call each, then `rounds` rounds with
    the systems interleaved (order rotated each round, so no system always follows the same one)."""
    for fn in fns.values():
        fn(batches[0])
    names, seconds = list(fns), {name: [] for name in fns}
    for k in range(rounds):
        for name in names[k % len(names) :] + names[: k % len(names)]:
            t0 = time.perf_counter()
            for x in batches:
                fns[name](x)
            seconds[name].append(time.perf_counter() - t0)
    return seconds


def speed(seconds: dict[str, list[float]], audio_seconds: float) -> dict:
    """x real time per system: the median round (the statistic), min and max, and the raw rounds."""
    return {
        name: {
            "median": round(audio_seconds / statistics.median(s), 2),
            "min": round(audio_seconds / max(s), 2),
            "max": round(audio_seconds / min(s), 2),
            "seconds": [round(t, 4) for t in s],
        }
        for name, s in seconds.items()
    }


def bench_arch(arch: str, audio: dict, args, folder: Path) -> dict:
    """Build the systems of one architecture on this CPU, then measure accuracy and speed."""
    print(f"[{arch}] building models and the runner's int8 artifact ...", flush=True)
    nemo = build_nemo(arch, args.quick)
    lean = build_model(*describe(nemo)).eval()
    int8, int8_info = runner_int8(lean, audio["calibration"], audio["gate"], args.quick, args.engine_depthwise)
    if not int8:
        print(f"[{arch}] runner int8: {int8_info['error']}", flush=True)
    elif args.engine_depthwise and "runner_int8_engine_dw" not in int8:
        print(f"[{arch}] --engine-depthwise: the AVX2 depthwise kernel does not run here; nothing to compare")
    feats, calibration = features(lean, audio["clips"]), features(lean, audio["calibration"])
    print(f"[{arch}] ONNX export and ONNX Runtime int8 ...", flush=True)
    with exportable_conformer():
        sessions = onnx_sessions(lean, calibration, args.threads, folder)
    print(f"[{arch}] OpenVINO and NNCF int8 ...", flush=True)
    compiled = openvino_models(
        folder / "enc_fp32.onnx", calibration, args.threads, arch == "fastconformer", "f32" if EMULATE else None
    )
    fns = system_fns(nemo, lean, int8, sessions, compiled)
    by8 = [torch.stack(feats[i : i + 8]) for i in range(0, len(feats), 8)]
    result = {
        "model": type(nemo).__name__,
        "size": "medium" if args.quick and arch == "fastconformer" else None,
        "params": sum(p.numel() for p in lean.parameters()),
        "clips": len(feats),
        "rounds": args.rounds,
        "quick": args.quick,
        "when": time.strftime("%Y-%m-%d %H:%M:%S"),
        "load_before": [round(x, 2) for x in os.getloadavg()],
        "emulated": EMULATE,
        "runner_int8": int8_info,
        "openvino_kernels": {name: openvino_kernels(m) for name, m in compiled.items()},
        "accuracy": accuracy(fns, by8, lean),
        "speed": {},
    }
    for b in (1, 8):
        batches = [torch.stack(feats[i : i + b]) for i in range(0, len(feats), b)]
        print(f"[{arch}] timing batch {b} ({args.rounds} rounds) ...", flush=True)
        result["speed"][f"b{b}"] = speed(time_rounds(fns, batches, args.rounds), len(feats) * CLIP_SECONDS)
        result["speed"][f"b{b}"]["batch"] = min(b, len(feats))
    result["load_after"] = [round(x, 2) for x in os.getloadavg()]
    return result


def versions() -> dict:
    import nemo
    import nncf
    import onnxruntime
    import openvino

    return {
        "torch": torch.__version__,
        "onnxruntime": onnxruntime.__version__,
        "openvino": openvino.get_version(),
        "nncf": nncf.__version__,
        "nemo": nemo.__version__,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", default=",".join(ARCHS), help="comma-separated: " + ", ".join(ARCHS))
    parser.add_argument("--rounds", type=int, default=5, help="timed rounds per batch size (median of them)")
    parser.add_argument("--clips", type=int, default=8, help="10 s utterances timed (and compared)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--quick", action="store_true", help="1 round, 2 clips, small calibration: checks the script")
    parser.add_argument("--emulate-avx2", action="store_true", help="on a VNNI CPU: the AVX2-only kind's kernels")
    parser.add_argument(
        "--engine-depthwise",
        action="store_true",
        help="where the runner's AVX2 depthwise kernel runs, also time the int8 model with the engine's own",
    )
    parser.add_argument("--out", default="benchmarks/results")
    args = parser.parse_args()
    archs = [a.strip() for a in args.arch.split(",") if a.strip()]
    if unknown := set(archs) - set(ARCHS):
        parser.error(f"unknown --arch {sorted(unknown)}; choose from {', '.join(ARCHS)}")
    if args.quick:
        args.rounds, args.clips = 1, 2
    elif args.rounds < 3:
        parser.error("--rounds must be >= 3 (the statistic is the median of the rounds); --quick for a check")
    start_load = round(os.getloadavg()[0], 2)  # before this benchmark adds its own
    quiet_nemo_logging()
    torch.set_num_threads(args.threads)
    cpu = cpu_info()
    if EMULATE and not has_vnni(cpu["flags"]):
        parser.error("--emulate-avx2 is for CPUs with VNNI or AMX; this CPU runs the AVX2 kind's kernels natively")
    print(f"CPU {cpu_label(cpu)} ({cpu['logical_cpus']} logical, {cpu['machine']}), flags: {', '.join(cpu['flags'])}")
    print(MODE + ("; ONNX Runtime is not capped (this CPU's own kernels)" if EMULATE else ""))
    ver = versions()
    print(", ".join(f"{k} {v}" for k, v in ver.items()) + f"; {args.threads} threads each", flush=True)
    audio = {
        "clips": ten_second_utterances(args.clips),
        "calibration": [a for _t, _v, a in synthesize_many(sentences(8 if args.quick else 32, seed=9), seed=9)],
        "gate": [a for _t, _v, a in synthesize_many(sentences(4 if args.quick else 16, seed=3), seed=3)],
    }
    suffix = ("-emulated-avx2" if EMULATE else "") + ("-quick" if args.quick else "")
    out = Path(args.out) / f"cpu_kinds-{cpu_tag(cpu)}{suffix}.json"
    saved = json.loads(out.read_text()) if out.exists() else {}
    report = {"cpu": cpu, "mode": MODE, "versions": ver, "threads": args.threads, "archs": saved.get("archs", {})}
    for arch in archs:
        with tempfile.TemporaryDirectory() as tmp:
            report["archs"][arch] = bench_arch(arch, audio, args, Path(tmp))
        report["archs"][arch]["load_at_start"] = start_load
        print_arch(arch, report["archs"][arch])
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(report, indent=2, default=str))  # after each architecture: a late failure keeps it
    print(f"\nwrote {out}")


if __name__ == "__main__":
    main()
