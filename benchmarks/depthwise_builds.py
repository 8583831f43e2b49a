"""Two or more builds of the AVX2 int8 depthwise kernel (`runner/int8/_depthwise.c`) side by side, with oneDNN's.

    .venv/bin/python benchmarks/depthwise_builds.py OLD.c NEW.c [--threads 2] [--calls 41]

Each source is compiled as `pip install` compiles it (gcc -O3 -fopenmp) into a temporary folder and loaded
with ctypes, so variants of the kernel are timed in one process on the same data: QuartzNet15x5's depthwise
shapes (channels, kernel, stride, dilation) on 10 s of frames, batch 1 and 8, 7-bit input. The sources must
have the current interface (`dw_forward` with stride, dilation, padding and output frames, since session 20).
Each build's output must equal the first build's. oneDNN's int8 depthwise conv on the same weights and input
is timed too (capped at its AVX2 kernels with `ONEDNN_MAX_CPU_ISA=AVX2` on a CPU with VNNI, set here before
torch loads). Needs only torch and gcc: no NeMo, so it runs on any x86 machine with AVX2.

Statistic, fixed before the runs: the median of `--calls` calls per build, the builds alternating call by call
after two warm-up calls each; ratios are the first build's median over each one's.
"""

from __future__ import annotations

import argparse
import ctypes
import os
import statistics
import subprocess
import sys
import tempfile
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from emulation import emulate_avx2, has_vnni  # noqa: E402

from runner.sysinfo import cpu_info, cpu_label  # noqa: E402  (reads /proc/cpuinfo; does not load torch)

if has_vnni(cpu_info()["flags"]):
    emulate_avx2(runner_flags=False)  # oneDNN's kernels of a CPU without VNNI

import torch  # noqa: E402
import torch.ao.nn.quantized as nnq  # noqa: E402
from alternate import alternated  # noqa: E402

# QuartzNet15x5's depthwise convs: (channels, kernel, stride, dilation, input frames of 10 s)
SHAPES = [(64, 33, 2, 1, 1000), (256, 33, 1, 1, 500), (256, 39, 1, 1, 500), (512, 51, 1, 1, 500)]
SHAPES += [(512, 63, 1, 1, 500), (512, 75, 1, 1, 500), (512, 87, 1, 2, 500)]
PTR, INT = ctypes.c_void_p, ctypes.c_int


def build(source: Path, folder: Path) -> ctypes.CDLL:
    out = folder / f"{source.stem}-{len(list(folder.iterdir()))}.so"
    subprocess.run(["gcc", "-O3", "-fopenmp", "-shared", "-fPIC", str(source), "-o", str(out)], check=True)
    lib = ctypes.CDLL(str(out))
    lib.dw_pack.argtypes, lib.dw_pack.restype = [PTR, INT, INT, PTR], None
    lib.dw_forward.argtypes = [PTR, INT, INT, INT, INT, INT, INT, INT, INT, PTR, PTR, PTR, PTR, PTR, INT, INT]
    lib.dw_forward.restype = INT
    return lib


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("sources", nargs="+", type=Path)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--calls", type=int, default=41)
    args = parser.parse_args()
    for missing in [s for s in args.sources if not s.is_file()]:
        sys.exit(f"{missing}: no such file (give the kernel's C sources, e.g. runner/int8/_depthwise.c)")
    torch.set_num_threads(args.threads)
    torch.backends.quantized.engine = "onednn"
    warnings.filterwarnings("ignore", message="torch.quantize_per_tensor")  # torch.ao's deprecation notice
    cpu = cpu_info()
    print(
        f"CPU {cpu_label(cpu)}, flags {' '.join(cpu['flags'])}; ONEDNN_MAX_CPU_ISA="
        f"{os.environ.get('ONEDNN_MAX_CPU_ISA', '-')}; {args.threads} threads; median of {args.calls} calls"
    )
    g = torch.Generator().manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        libs = {f"{s.name}#{i}": build(s, Path(tmp)) for i, s in enumerate(args.sources)}
        for batch in (1, 8):
            for channels, kernel, stride, dilation, frames in SHAPES:
                pad = dilation * (kernel // 2)
                frames_out = (frames + 2 * pad - dilation * (kernel - 1) - 1) // stride + 1
                w = torch.randint(-127, 128, (channels, kernel), dtype=torch.int8, generator=g)
                x = torch.randint(0, 128, (batch, frames, channels), dtype=torch.uint8, generator=g)
                mul, add = torch.rand(channels) * 0.01, torch.rand(channels) * 10
                comp = torch.zeros(channels, dtype=torch.int32)
                packed = torch.empty(channels * ((kernel + 1) // 2), dtype=torch.int32)
                ptrs = (
                    x.data_ptr(),
                    batch,
                    frames,
                    channels,
                    kernel,
                    stride,
                    dilation,
                    pad,
                    frames_out,
                    packed.data_ptr(),
                    mul.data_ptr(),
                    add.data_ptr(),
                    comp.data_ptr(),
                )
                outs = {name: torch.empty(batch, frames_out, channels, dtype=torch.uint8) for name in libs}
                calls = {}
                for name, lib in libs.items():
                    lib.dw_pack(w.data_ptr(), channels, kernel, packed.data_ptr())  # same packing in every build
                    calls[name] = lambda lib=lib, o=outs[name], a=ptrs: lib.dw_forward(
                        *a, o.data_ptr(), 3, args.threads
                    )
                conv = nnq.Conv1d(channels, channels, kernel, stride, pad, dilation, groups=channels)
                scales = torch.full((channels,), 0.01, dtype=torch.double)
                weight = torch.quantize_per_channel(
                    w.float().unsqueeze(1) * 0.01, scales, torch.zeros(channels, dtype=torch.long), 0, torch.qint8
                )
                conv.set_weight_bias(weight, torch.zeros(channels))
                conv.scale, conv.zero_point = 0.05, 3
                xq = torch._make_per_tensor_quantized_tensor(x, 0.02, 3).permute(0, 2, 1)  # channels last
                calls["oneDNN"] = lambda conv=conv, xq=xq: conv(xq)
                with torch.inference_mode():
                    times = alternated(calls, args.calls, warmups=2)
                first = next(iter(outs.values()))
                if not all(torch.equal(first, o) for o in outs.values()):
                    sys.exit(f"batch {batch}, C {channels}, K {kernel}, S {stride}, D {dilation}: the builds differ")
                med = {name: statistics.median(t) * 1e3 for name, t in times.items()}
                base = med[next(iter(libs))]
                row = "  ".join(f"{name} {m:.3f} ms ({base / m:.2f}x)" for name, m in med.items() if name != "oneDNN")
                print(
                    f"batch {batch} C {channels} K {kernel} S {stride} D {dilation}: oneDNN {med['oneDNN']:.3f} ms "
                    f"({med['oneDNN'] / base:.2f}x the first build's time); {row}",
                    flush=True,
                )


if __name__ == "__main__":
    main()
