"""Where an int8 conv-family forward spends its time besides the kernels; what the direct forward saves (issue 15).

    # artifacts from `worker_check.py save DIR` (where NeMo is); then, torch only:
    .venv/bin/python benchmarks/call_overhead.py DIR [--emulate-avx2] [--arch quartznet] [--threads 2] [--rounds 9]

The int8 model is built as a worker builds it (`build_int8_model(bytes, "auto")`, self-check included) and run
on the saved 10 s clips at batch 1 and 8, three ways, alternated:
- **as a job runs it**: on the onednn engine, `runner.int8.direct`'s forward (uint8 tensors, oneDNN called
  directly, residual adds fused into the convs);
- **the modules**: the same model on torch's quantized modules, the first call (which fills each conv's
  one-shape primitive cache) on another clip length, as a worker's self-check does: a job's batches differ in
  length, so every call builds its oneDNN primitive descriptor again;
- **the modules with a warm primitive cache**: a copy whose first call is the timed shape (not how a job runs;
  what that set-up costs).

For the first two, one more forward splits the time: oneDNN's kernels (`ONEDNN_VERBOSE` exec times), our AVX2
depthwise kernel where it applies (forward hooks on its modules, Python wrapper included), and the rest
(Python, torch's dispatch and per-call set-up, quantized adds, masking, quantize and dequantize), also per
int8 conv call.

Statistic, fixed before the runs: the median of `--rounds` rounds (min-max), the three alternating within each
round after one warm-up call each; the split from one extra forward each.
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from emulation import emulate_avx2, write_results  # noqa: E402

EMULATE = "--emulate-avx2" in sys.argv
MODE = emulate_avx2() if EMULATE else "native"  # before torch loads oneDNN

import torch  # noqa: E402
from alternate import alternated, figure  # noqa: E402

from runner.int8 import depthwise, direct  # noqa: E402
from runner.int8.artifact import build_int8_model  # noqa: E402
from runner.int8.engines import engine_scope  # noqa: E402
from runner.sysinfo import cpu_info, cpu_label, int8_flags  # noqa: E402


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


def hooked(model, run) -> tuple[float, int, int]:
    """(milliseconds inside our depthwise kernel's modules, their calls, all int8 conv calls: oneDNN's and ours,
    each paying a per-call set-up) during one `run()` of `model` on its modules."""
    spent, start = [0.0, 0, 0], {}

    def pre(module, _args):
        start[id(module)] = time.perf_counter()

    def post(module, _args, _out):
        if isinstance(module, depthwise.DepthwiseConv1d):
            spent[0] += time.perf_counter() - start[id(module)]
            spent[1] += 1
        spent[2] += 1

    mods = [m for m in model.modules() if type(m).__name__ in ("Conv1d", "ConvReLU1d", "DepthwiseConv1d")]
    handles = [h for m in mods for h in (m.register_forward_pre_hook(pre), m.register_forward_hook(post))]
    try:
        run()
    finally:
        for h in handles:
            h.remove()
    return 1e3 * spent[0], spent[1], spent[2]


def modules_only(model):
    """`model` with its conv-family encoder on the quantized modules (`runner.int8.direct` off)."""
    model.qencoder.direct = False
    return model


@torch.inference_mode()
def one_batch(loaded, f: torch.Tensor, n: torch.Tensor, rounds: int) -> dict:
    batch, model = len(f), loaded.model
    direct_on = bool(getattr(model.qencoder, "direct", False)) and direct.plan_for(model.qencoder) is not None
    with engine_scope(loaded.engine):
        modules = modules_only(copy.deepcopy(model))  # its own primitive caches
        warm = modules_only(copy.deepcopy(model))
    modules.logits(f[:1, :, :500], n[:1].clamp(max=500))  # its first call another shape, as a worker's self-check
    warm.logits(f, n)  # its first call: the timed shape

    def run(m):
        return lambda: m.logits(f, n)

    t = alternated({"job": run(model), "modules": run(modules), "warm": run(warm)}, rounds)
    kernels = {"job": onednn_exec_ms(run(model))[0], "modules": onednn_exec_ms(run(modules))[0]}
    dw_ms, dw_calls, calls = hooked(modules, run(modules))  # the same kernel either way; hooks need the modules
    out = {"direct_forward": direct_on, "conv_calls": calls, "our_depthwise_calls": dw_calls}
    print(f"  batch {batch}, {calls} int8 convs ({dw_calls} on our depthwise kernel):", flush=True)
    for key, label in (("job", f"as a job runs it (direct forward: {direct_on})"), ("modules", "the modules")):
        whole = 1e3 * statistics.median(t[key])
        rest = whole - kernels[key] - dw_ms
        row = out[key] = {
            "x_real_time": figure([10 * batch / s for s in t[key]], digits=1),
            "forward_ms": figure(t[key], 1e3, 2),
            "onednn_exec_ms": round(kernels[key], 2),
            "our_depthwise_ms": round(dw_ms, 2),
            "rest_ms": round(rest, 2),
            "rest_share": round(rest / whole, 3),
            "rest_us_per_conv_call": round(1e3 * rest / max(calls, 1), 1),
        }
        print(
            f"    {label}: {whole:.1f} ms [{row['forward_ms']['min']:.1f}-{row['forward_ms']['max']:.1f}] "
            f"({row['x_real_time']['median']}x real time); oneDNN kernels {kernels[key]:.1f} ms, our depthwise "
            f"{dw_ms:.1f} ms, the rest {rest:.1f} ms ({row['rest_share']:.0%}, {row['rest_us_per_conv_call']} us "
            "per conv)",
            flush=True,
        )
    out["modules_warm_cache"] = {"forward_ms": figure(t["warm"], 1e3, 2)}
    speedup = statistics.median(t["modules"]) / statistics.median(t["job"])
    out["job_vs_modules"] = round(speedup, 3)
    print(
        f"    the modules with a warm primitive cache: {1e3 * statistics.median(t['warm']):.1f} ms; "
        f"as a job runs it: {speedup:.2f}x the modules' speed",
        flush=True,
    )
    return out


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
        row["batches"][str(batch)] = one_batch(loaded, test["feats"][:batch], test["lens"][:batch], rounds)
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
    write_results("call_overhead", report, EMULATE, args.out)


if __name__ == "__main__":
    main()
