"""Where an int8 conv-family forward spends its time besides the kernels: the cost of each quantized call (issue 15).

    # artifacts from `worker_check.py save DIR` (where NeMo is); then, torch only:
    .venv/bin/python benchmarks/call_overhead.py DIR [--emulate-avx2] [--arch quartznet] [--threads 2] [--rounds 9]

The int8 model is built as a worker builds it (`build_int8_model(bytes, "auto")`, self-check included) and run
on the saved 10 s clips at batch 1 and 8. Per forward:
- **kernels**: what oneDNN reports executing (`ONEDNN_VERBOSE` exec times, summed over one forward), and our
  AVX2 depthwise kernel's modules where it applies (forward hooks, so their Python wrapper is counted in);
- **the rest** = the whole forward minus both: Python, torch's dispatch and per-call set-up of each quantized
  conv, the quantized adds, quantize and dequantize; also divided by the int8 conv calls.
- **a warm primitive cache**: torch's onednn convs keep one oneDNN primitive per module, made on the module's
  first call (the self-check's clip lengths, in a worker). A call of any other shape builds a primitive
  descriptor and looks the primitive up again. A job's batches differ in length, so that is how a job runs.
  A copy of the model whose first call is the timed shape shows what that set-up costs (an upper bound of
  what removing it would gain; not how a job runs).
- **oneDNN called directly** (onednn engine only): each pointwise conv through its module against the same
  weights through `torch.ops.onednn.qconv_pointwise` (the op torch's compiled int8 graphs call: it builds the
  primitive descriptor with oneDNN's own API, for any shape) on a plain uint8 copy of its input, outputs
  compared step by step. What a forward on plain uint8 tensors would save on those convs.

Statistic, fixed before the runs: the median of `--rounds` rounds (min-max), the two models alternating within
each round after one warm-up call each; the kernel split comes from one extra forward (verbose on); per
pointwise conv, the median of 4 x `--rounds` + 1 alternated calls, summed.
"""

from __future__ import annotations

import argparse
import copy
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

from emulation import emulate_avx2  # noqa: E402

EMULATE = "--emulate-avx2" in sys.argv
MODE = emulate_avx2() if EMULATE else "native"  # before torch loads oneDNN

import torch  # noqa: E402
from alternate import alternated, figure  # noqa: E402

from runner.int8 import depthwise  # noqa: E402
from runner.int8.artifact import build_int8_model  # noqa: E402
from runner.int8.engines import engine_scope  # noqa: E402
from runner.sysinfo import cpu_info, cpu_label, cpu_tag, int8_flags  # noqa: E402


def onednn_exec_ms(run) -> tuple[float, int]:
    """(summed oneDNN exec milliseconds, primitive executions) of one `run()`: oneDNN prints its verbose lines
    on the process's stdout from C, so file descriptor 1 is pointed at a file meanwhile."""
    sys.stdout.flush()
    saved = os.dup(1)
    with tempfile.TemporaryFile(mode="w+") as log:
        os.dup2(log.fileno(), 1)
        try:
            with torch.backends.mkldnn.verbose(torch.backends.mkldnn.VERBOSE_ON):
                run()
        finally:
            os.dup2(saved, 1)
            os.close(saved)
        log.seek(0)
        lines = [line.split(",") for line in log if line.startswith("onednn_verbose") and ",primitive,exec," in line]
    return sum(float(p[-1]) for p in lines), len(lines)


def depthwise_ms(model, run) -> tuple[float, int]:
    """(milliseconds inside our depthwise kernel's modules, their calls) during one `run()`."""
    spent, start = [0.0, 0], {}

    def pre(module, _args):
        start[id(module)] = time.perf_counter()

    def post(module, _args, _out):
        spent[0] += time.perf_counter() - start[id(module)]
        spent[1] += 1

    mods = [m for m in model.modules() if isinstance(m, depthwise.DepthwiseConv1d)]
    handles = [h for m in mods for h in (m.register_forward_pre_hook(pre), m.register_forward_hook(post))]
    try:
        run()
    finally:
        for h in handles:
            h.remove()
    return 1e3 * spent[0], spent[1]


def conv_calls(model, run) -> int:
    """int8 conv calls in one `run()`: oneDNN's and our depthwise kernel's (each pays a per-call set-up)."""
    calls = [0]

    def count(*_):
        calls[0] += 1

    kinds = ("Conv1d", "ConvReLU1d", "DepthwiseConv1d")
    handles = [m.register_forward_hook(count) for m in model.modules() if type(m).__name__ in kinds]
    try:
        run()
    finally:
        for h in handles:
            h.remove()
    return calls[0]


@torch.inference_mode()
def one_batch(loaded, f: torch.Tensor, n: torch.Tensor, rounds: int) -> dict:
    batch = len(f)
    with engine_scope(loaded.engine):
        warm = copy.deepcopy(loaded.model)  # re-packs the weights: a fresh primitive cache per conv
    warm.logits(f, n)  # its first call: the timed shape

    def run():
        return loaded.model.logits(f, n)

    t = alternated({"as a job runs it": run, "warm cache": lambda: warm.logits(f, n)}, rounds)

    kernel_ms, executions = onednn_exec_ms(run)
    dw_ms, dw_calls = depthwise_ms(loaded.model, run)
    calls = conv_calls(loaded.model, run)
    whole = statistics.median(t["as a job runs it"])
    rest = 1e3 * whole - kernel_ms - dw_ms
    out = {
        "x_real_time": figure([10 * batch / s for s in t["as a job runs it"]], digits=1),
        "forward_ms": figure(t["as a job runs it"], 1e3, 2),
        "warm_cache_forward_ms": figure(t["warm cache"], 1e3, 2),
        "onednn_exec_ms": round(kernel_ms, 2),
        "onednn_executions": executions,
        "our_depthwise_ms": round(dw_ms, 2),
        "our_depthwise_calls": dw_calls,
        "conv_calls": calls,
        "rest_ms": round(rest, 2),
        "rest_share": round(rest / (1e3 * whole), 3),
        "rest_us_per_call": round(1e3 * rest / max(calls, 1), 1),
    }
    warm_ms = statistics.median(t["warm cache"]) * 1e3
    print(
        f"  batch {batch}: forward {out['forward_ms']['median']:.1f} ms "
        f"[{out['forward_ms']['min']:.1f}-{out['forward_ms']['max']:.1f}] ({out['x_real_time']['median']}x real "
        f"time); oneDNN kernels {kernel_ms:.1f} ms in {executions} calls, our depthwise {dw_ms:.1f} ms in "
        f"{dw_calls}; the rest {rest:.1f} ms ({out['rest_share']:.0%}, {out['rest_us_per_call']} us per "
        f"conv call, {calls} calls); warm primitive cache {warm_ms:.1f} ms "
        f"({1 - warm_ms / (1e3 * whole):+.1%} of the forward saved)",
        flush=True,
    )
    return out


def pointwise_inputs(model, run) -> dict:
    """{int8 pointwise conv module: the quantized input of its first call} during one `run()`."""
    seen: dict = {}

    def grab(module, args):
        seen.setdefault(module, args[0])

    mods = [m for m in model.modules() if type(m).__name__ in ("Conv1d", "ConvReLU1d") and m.kernel_size == (1,)]
    handles = [m.register_forward_pre_hook(grab) for m in mods if m.groups == 1]
    try:
        run()
    finally:
        for h in handles:
            h.remove()
    return seen


@torch.inference_mode()
def direct_calls(loaded, f: torch.Tensor, n: torch.Tensor, rounds: int) -> dict:
    """Each pointwise conv as the model calls it (`quantized::conv1d(_relu)`, through its module) against the same
    weights through `torch.ops.onednn.qconv_pointwise` on a plain uint8 copy of the same input (oneDNN's API
    called directly, which torch made for its compiled int8 graphs). Summed over one forward: median seconds
    per call of `rounds` alternated calls each; the outputs compared step by step."""
    ms = {"module": 0.0, "direct": 0.0}
    worst, differing, total = 0, 0, 0
    with engine_scope(loaded.engine):
        for conv, x in pointwise_inputs(loaded.model, lambda: loaded.model.logits(f, n)).items():
            w, relu = conv.weight(), type(conv).__name__ == "ConvReLU1d"
            scales, zeros = w.q_per_channel_scales().float(), torch.zeros(w.shape[0], dtype=torch.long)
            u = x.int_repr().transpose(1, 2).contiguous().transpose(1, 2).unsqueeze(2)  # [B, C, 1, T], channels last
            stride = [1, conv.stride[0]]
            # packed for this very shape: oneDNN may want another weight layout for another, and would reorder
            packed = torch.ops.onednn.qconv_prepack(
                w.int_repr().unsqueeze(2), scales, x.q_scale(), x.q_zero_point(), stride, [0, 0], [1, 1], 1, u.shape
            )
            args = (u, x.q_scale(), x.q_zero_point(), packed, scales, zeros, conv.bias(), stride, [0, 0], [1, 1], 1)
            post = (float(conv.scale), int(conv.zero_point), None, "relu" if relu else "none", [], "")

            def direct(args=args, post=post):
                return torch.ops.onednn.qconv_pointwise(*args, *post)

            steps = (direct().squeeze(2).int() - conv(x).int_repr().int()).abs()
            worst, differing, total = (
                max(worst, int(steps.max())),
                differing + int((steps > 0).sum()),
                total + steps.numel(),
            )
            t = alternated({"module": lambda conv=conv, x=x: conv(x), "direct": direct}, rounds)
            for k in ms:
                ms[k] += 1e3 * statistics.median(t[k])
    return {
        "pointwise_module_ms": round(ms["module"], 2),
        "pointwise_direct_ms": round(ms["direct"], 2),
        "direct_max_step_difference": worst,
        "direct_outputs_differing": differing,
        "outputs_compared": total,
    }


def measure(folder: Path, arch: str, rounds: int) -> dict:
    data = (folder / f"{arch}.int8").read_bytes()
    test = torch.load(folder / f"{arch}-test.pt")
    loaded = build_int8_model(data, "auto")
    check = loaded.int8_check
    print(
        f"{arch}: {loaded.engine}, {check['activation_bits']}-bit activations, depthwise "
        f"{check.get('depthwise_convs', '-')}; self-check cosine {check['logit_cosine']:.5f}",
        flush=True,
    )
    row = {"engine": loaded.engine, "depthwise_convs": check.get("depthwise_convs"), "batches": {}}
    for batch in (1, 8):
        f, n = test["feats"][:batch], test["lens"][:batch]
        out = row["batches"][str(batch)] = one_batch(loaded, f, n, rounds)
        if loaded.engine == "onednn":
            out.update(direct_calls(loaded, f, n, 4 * rounds + 1))
            saved = out["pointwise_module_ms"] - out["pointwise_direct_ms"]
            print(
                f"    pointwise convs called as the model does {out['pointwise_module_ms']:.1f} ms, through "
                f"torch.ops.onednn.qconv_pointwise {out['pointwise_direct_ms']:.1f} ms ({saved:.1f} ms, "
                f"{saved / out['forward_ms']['median']:.1%} of the forward); outputs: "
                f"{out['direct_outputs_differing']} of {out['outputs_compared']} differ, by at most "
                f"{out['direct_max_step_difference']} step",
                flush=True,
            )
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folder", type=Path, help="where `worker_check.py save` wrote <arch>.int8 and <arch>-test.pt")
    parser.add_argument("--arch", nargs="+", default=["quartznet"])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=9)
    parser.add_argument("--emulate-avx2", action="store_true")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    for arch in args.arch:
        for name in (f"{arch}.int8", f"{arch}-test.pt"):
            if not (args.folder / name).is_file():
                sys.exit(f"{args.folder / name}: missing; `worker_check.py save {args.folder}` makes it where NeMo is")
    cpu = cpu_info()
    print(f"CPU {cpu_label(cpu)}; flags {' '.join(cpu['flags'])}", flush=True)
    print(f"{MODE}; int8 flags read: {' '.join(int8_flags())}; torch {torch.__version__}, {args.threads} threads")
    report = {
        "cpu": cpu,
        "mode": MODE,
        "torch": torch.__version__,
        "threads": args.threads,
        "rounds": args.rounds,
        "statistic": "median of alternated rounds (min-max); kernel split from one forward",
        "archs": {arch: measure(args.folder, arch, args.rounds) for arch in args.arch},
    }
    name = f"call_overhead-{cpu_tag()}{'-emulated-avx2' if EMULATE else ''}.json"
    out = args.out or ROOT / "benchmarks" / "results" / name
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=1, default=str))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
