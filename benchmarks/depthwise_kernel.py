"""The AVX2 int8 depthwise kernel (`runner/int8/depthwise.py`) against the engine's, on the CPU kind it is for.

    .venv/bin/python benchmarks/depthwise_kernel.py [--arch quartznet|citrinet] [--rounds 7] [--threads 2]

The kernel runs on x86 CPUs with AVX2 and without VNNI. On such a CPU this script runs natively. On a CPU
with VNNI it emulates that kind: oneDNN is capped to AVX2 (`ONEDNN_MAX_CPU_ISA=AVX2`, set here before torch
loads, so oneDNN dispatches to the very kernels an AVX2-only CPU runs, as `ONEDNN_VERBOSE` shows:
`jit_uni_int8:avx2`) and the int8 flags are overridden to `avx2 fma` (7-bit activations, as there). The
output says which. The CPU's cores, clock and caches stay this CPU's: emulated figures show the kernels'
ratio, not an AVX2 machine's speed.

1. Each depthwise shape of the model (channels, kernel, stride, dilation) on 10 s of frames (500 at the
   encoder's rate after its 2x stride; the strided first conv reads 1000), batch 1 and 8: the engine's
   `nnq.Conv1d` against `DepthwiseConv1d` on the same int8 weights and input; both outputs compared.
2. The whole int8 model as a job builds it (`quantize_model`, histogram observer, then
   `build_int8_model(onednn)`), with our kernel and with the engine's, encoder + decoder on the features of
   10 s of audio, batch 1 and 8: x real time, and logit cosine against fp32.

Statistic, fixed before the runs: for each measurement, the median of `--rounds` rounds in which the two
variants alternate (min-max beside it); speed-up = median engine time / median kernel time.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from emulation import emulate_avx2, has_vnni, with_engine_depthwise, write_results  # noqa: E402

from runner.sysinfo import cpu_info  # noqa: E402  (reads /proc/cpuinfo; does not load torch)

EMULATED = has_vnni(cpu_info()["flags"])
MODE = emulate_avx2() if EMULATED else "native"  # before torch loads oneDNN

import torch  # noqa: E402
import torch.ao.nn.quantized as nnq  # noqa: E402
from alternate import alternated, figure  # noqa: E402
from cpu_kinds import build_nemo  # noqa: E402

from runner.int8 import depthwise  # noqa: E402
from runner.int8.artifact import build_int8_model  # noqa: E402
from runner.int8.config import Settings  # noqa: E402
from runner.int8.engines import engine_scope  # noqa: E402
from runner.int8.pipeline import quantize_model  # noqa: E402
from runner.model.ctc import build_model  # noqa: E402
from runner.model.nemo_loader import describe, quiet_nemo_logging  # noqa: E402
from runner.sysinfo import cpu_label, int8_flags  # noqa: E402
from runner.training.corpus import sentences, synthesize_many  # noqa: E402


@torch.inference_mode()
def kernel_shapes(int8_model, frames: int, rounds: int) -> list[dict]:
    """Each distinct depthwise (channels, kernel, stride, dilation) of the model: the engine's conv vs ours."""
    convs = [m for m in int8_model.modules() if isinstance(m, depthwise.DepthwiseConv1d)]
    shapes = sorted({(m.in_channels, m.kernel_size[0], m.stride[0], m.dilation[0]): m for m in convs}.items())
    rows = []
    for (channels, kernel, stride, dilation), ours in shapes:
        engine_conv = nnq.Conv1d(
            channels, channels, kernel, stride, ours.padding[0], dilation, groups=channels, bias=True
        )
        engine_conv.set_weight_bias(ours.weight(), ours.bias())
        engine_conv.scale, engine_conv.zero_point = ours.scale, ours.zero_point
        for batch in (1, 8):
            frames_in = frames * stride  # a strided conv reads the frames before its stride
            x = torch.quantize_per_tensor(torch.randn(batch, channels, frames_in), 0.05, 60, torch.quint8)
            x = x.transpose(1, 2).contiguous().transpose(1, 2)  # channels last, as convs hand it on
            diff = (engine_conv(x).int_repr().int() - ours(x).int_repr().int()).abs()
            t = alternated({"engine": lambda c=engine_conv, x=x: c(x), "ours": lambda c=ours, x=x: c(x)}, rounds * 3)
            macs = batch * channels * kernel * ours.frames_out(frames_in)
            e, o = statistics.median(t["engine"]), statistics.median(t["ours"])
            rows.append(
                {
                    "channels": channels,
                    "kernel": kernel,
                    "stride": stride,
                    "dilation": dilation,
                    "batch": batch,
                    "engine_ms": figure(t["engine"], 1e3),
                    "ours_ms": figure(t["ours"], 1e3),
                    "speedup": round(e / o, 2),
                    "engine_gmacs": round(macs / e / 1e9, 1),
                    "ours_gmacs": round(macs / o / 1e9, 1),
                    "max_step_difference": int(diff.max()),
                    "outputs_differing": int(diff.gt(0).sum()),
                    "outputs": diff.numel(),
                }
            )
            r = rows[-1]
            print(
                f"  C {channels:4d} K {kernel:2d} S {stride} D {dilation} batch {batch}: "
                f"engine {r['engine_ms']['median']:.3f} ms ({r['engine_gmacs']} G/s), "
                f"ours {r['ours_ms']['median']:.3f} ms ({r['ours_gmacs']} G/s): "
                f"{r['speedup']:.2f}x; outputs one step off: {r['outputs_differing']} of {r['outputs']}",
                flush=True,
            )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", default="quartznet", choices=("quartznet", "citrinet"))
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    quiet_nemo_logging()
    cpu = cpu_info()
    print(f"CPU {cpu_label(cpu)}, flags {' '.join(cpu['flags'])}; int8 flags read: {' '.join(int8_flags())}")
    print(f"{MODE}; {args.threads} threads; kernel applies: {depthwise.applies('onednn')}")
    if not depthwise.applies("onednn"):
        sys.exit("the AVX2 depthwise kernel does not apply here (see runner/int8/depthwise.py: applies)")

    nemo = build_nemo(args.arch, quick=True)
    lean = build_model(*describe(nemo)).eval()
    clips = [a for _, _, a in synthesize_many(sentences(30, seed=5), seed=5)]
    t0 = time.perf_counter()
    settings = Settings(max_wer_increase=1.0, observers=("histogram",), engine="onednn")
    art = quantize_model(lean, clips[:20], clips[20:], None, settings)
    print(f"quantized in {time.perf_counter() - t0:.1f} s")
    data = art.to_bytes()
    ours = build_int8_model(data, "onednn")
    engine = with_engine_depthwise(data, "onednn")
    print(
        f"self-checks: ours {ours.int8_check['depthwise_convs']} cosine {ours.int8_check['logit_cosine']}, "
        f"engine {engine.int8_check['depthwise_convs']} cosine {engine.int8_check['logit_cosine']}"
    )

    audio = torch.randn(8, 160000) * 0.05
    with torch.inference_mode():
        feats, lens = lean.features(audio, torch.full((8,), 160000))
    print("1. each depthwise shape on 10 s: 500 frames after the 2x stride (the strided conv reads 1000):")
    with engine_scope("onednn"):
        shapes = kernel_shapes(ours.model.qencoder, 500, args.rounds)
    print("2. the whole int8 model (encoder + decoder on 10 s features), x real time:")
    models = []
    for batch in (1, 8):
        f, n = feats[:batch], lens[:batch]
        with torch.inference_mode():
            ref = lean.logits(f, n)[0]
            built = {"engine": engine, "ours": ours}
            t = alternated({name: lambda m=m, f=f, n=n: m.model.logits(f, n) for name, m in built.items()}, args.rounds)
            cos = {
                name: round(float(torch.nn.functional.cosine_similarity(m.model.logits(f, n)[0], ref, dim=1).mean()), 6)
                for name, m in built.items()
            }
        row = {"batch": batch, "cosine_vs_fp32": cos}
        for name in ("engine", "ours"):
            xrt = [10 * batch / s for s in t[name]]
            row[name] = {"x_real_time": figure(xrt), "ms": figure(t[name], 1e3)}
        row["speedup"] = round(statistics.median(t["engine"]) / statistics.median(t["ours"]), 3)
        models.append(row)
        print(
            f"  batch {batch}: engine's depthwise {row['engine']['x_real_time']['median']:.1f} "
            f"[{row['engine']['x_real_time']['min']:.1f}-{row['engine']['x_real_time']['max']:.1f}], ours "
            f"{row['ours']['x_real_time']['median']:.1f} [{row['ours']['x_real_time']['min']:.1f}-"
            f"{row['ours']['x_real_time']['max']:.1f}]: {row['speedup']:.2f}x; cosine vs fp32 {cos}",
            flush=True,
        )
    report = {
        "cpu": cpu["model"],
        "cpu_flags": cpu["flags"],
        "mode": MODE,
        "threads": args.threads,
        "torch": torch.__version__,
        "rounds": args.rounds,
        "statistic": "median of alternated rounds (min-max)",
        "self_check": {"ours": ours.int8_check, "engine": engine.int8_check},
        "shapes": shapes,
        "model": models,
    }
    write_results(f"depthwise_kernel_{args.arch}", report, EMULATED, args.out)


if __name__ == "__main__":
    main()
