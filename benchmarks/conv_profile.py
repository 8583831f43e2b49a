"""Where QuartzNet15x5's int8 time goes: depthwise vs pointwise convolutions, int8 vs fp32 (issue 15).

    .venv/bin/python benchmarks/conv_profile.py [--engine onednn] [--rounds 5] [--threads 2]

QuartzNet15x5 architecture (random weights, randomized BN, as `cpu_kinds.py` builds it), calibrated
with the histogram observer on 20 espeak-ng clips and converted by the runner's pipeline (gate not
enforced), rebuilt as a worker does on `--engine`. Every convolution module of the int8 encoder and its
fp32 counterpart is timed with forward hooks on 10 s features at batch 1 and 8. Kinds: depthwise
(groups == channels, kernels 33-87), pointwise (kernel 1), other (the first conv, the decoder).

Statistic, fixed before the runs: per kind, the median over `--rounds` rounds of the kind's summed
seconds per forward pass (min-max); its share of the hooked total; and the kind's int8 speed-up over
fp32 = median fp32 / median int8. FLOPs per kind (multiply-adds) say what each kind should cost.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections import defaultdict
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from cpu_kinds import build_nemo  # noqa: E402

from runner.int8.artifact import build_int8_model  # noqa: E402
from runner.int8.config import Settings  # noqa: E402
from runner.int8.pipeline import quantize_model  # noqa: E402
from runner.model.ctc import build_model  # noqa: E402
from runner.model.nemo_loader import describe, quiet_nemo_logging  # noqa: E402
from runner.sysinfo import cpu_info, int8_flags  # noqa: E402
from runner.training.corpus import sentences, synthesize_many  # noqa: E402


def kind_of(module) -> str | None:
    groups, kernel = getattr(module, "groups", None), getattr(module, "kernel_size", None)
    if groups is None or kernel is None:
        return None
    kernel = kernel[0] if isinstance(kernel, tuple) else kernel
    if groups > 1 and groups == getattr(module, "in_channels", -1):
        return "depthwise"
    return "pointwise" if kernel == 1 else "other"


@torch.inference_mode()
def count_macs(model, feats: torch.Tensor, lens: torch.Tensor) -> dict[str, float]:
    """Multiply-adds per kind in one forward: each conv's weights times its output frames and items, read from
    its output's shape (the encoder runs at half the feature frame rate after the first conv's stride; until
    session 20 every conv was counted at the feature rate, which doubled the G and G/s figures)."""
    counted: dict[str, float] = defaultdict(float)

    def count(module, _args, out, kind):
        k = module.kernel_size[0] if isinstance(module.kernel_size, tuple) else module.kernel_size
        counted[kind] += module.out_channels * (module.in_channels // module.groups) * k * out.shape[0] * out.shape[-1]

    handles = []
    for module in model.modules():
        kind = kind_of(module)
        if kind is not None and not list(module.children()):
            handles.append(module.register_forward_hook(lambda m, a, o, kind=kind: count(m, a, o, kind)))
    try:
        model.forward_features(feats, lens)
    finally:
        for h in handles:
            h.remove()
    return counted


def hook_all(model, seconds: dict) -> list:
    handles = []
    for module in model.modules():
        kind = kind_of(module)
        if kind is None or list(module.children()):
            continue
        state = {}

        def pre(_m, _i, state=state):
            state["t"] = time.perf_counter()

        def post(_m, _i, _o, state=state, kind=kind):
            seconds[kind] += time.perf_counter() - state["t"]

        handles += [module.register_forward_pre_hook(pre), module.register_forward_hook(post)]
    return handles


@torch.inference_mode()
def profile(model, feats: torch.Tensor, lens: torch.Tensor, rounds: int) -> dict[str, list[float]]:
    model.forward_features(feats, lens)  # warm-up: kernels made for this shape
    per_round = defaultdict(list)
    for _ in range(rounds):
        seconds: dict[str, float] = defaultdict(float)
        handles = hook_all(model, seconds)
        t0 = time.perf_counter()
        model.forward_features(feats, lens)
        seconds["whole forward"] = time.perf_counter() - t0
        for h in handles:
            h.remove()
        for k, v in seconds.items():
            per_round[k].append(v)
    return per_round


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--engine", default="onednn")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    quiet_nemo_logging()
    cpu = cpu_info()
    print(f"CPU {cpu['model']}, int8 flags: {', '.join(int8_flags()) or 'none'}, {args.threads} threads, {args.engine}")
    nemo = build_nemo("quartznet", quick=True)
    lean = build_model(*describe(nemo)).eval()
    clips = [a for _, _, a in synthesize_many(sentences(30, seed=5), seed=5)]
    art = quantize_model(lean, clips[:20], clips[20:], None, Settings(max_wer_increase=1.0, observers=("histogram",)))
    int8 = build_int8_model(art.to_bytes(), args.engine).model
    int8.qencoder.direct = False  # per-conv hooks need the modules (`runner.int8.direct` calls oneDNN itself)
    audio = torch.randn(8, 160000) * 0.05
    for batch in (1, 8):
        feats, lens = lean.features(audio[:batch], torch.full((batch,), 160000))
        flops = count_macs(lean, feats, lens)
        fp32 = profile(lean, feats, lens, args.rounds)
        q8 = profile(int8, feats, lens, args.rounds)
        print(f"batch {batch} (10 s each): kind, GMACs, fp32 ms, int8 ms (min-max), int8 share, int8 speed-up")
        total8 = statistics.median(q8["whole forward"])
        for kind in ("depthwise", "pointwise", "other", "whole forward"):
            if not fp32[kind] or not q8[kind]:
                continue  # e.g. the first conv: fp32 in one model, int8 in the other
            f, q = statistics.median(fp32[kind]), statistics.median(q8[kind])
            print(
                f"  {kind:13s} {flops.get(kind, sum(flops.values())) / 1e9:7.2f} {1e3 * f:8.1f} {1e3 * q:8.1f} "
                f"({1e3 * min(q8[kind]):.1f}-{1e3 * max(q8[kind]):.1f}) {q / total8:6.1%} {f / q:6.2f}x"
            )
        print(f"  int8 x real time, whole forward: {10 * batch / total8:.1f} (hooks included)")


if __name__ == "__main__":
    main()
