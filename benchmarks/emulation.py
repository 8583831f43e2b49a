"""The AVX2-only CPU kind, emulated on a CPU with VNNI or AMX, for the benchmarks that compare int8 kernels.

Call before anything loads torch (or OpenVINO): the caps are read once, when a library first dispatches.
- oneDNN (torch's onednn, x86 and fbgemm engines' convs, and OpenVINO's fork of it): `ONEDNN_MAX_CPU_ISA=AVX2`
  makes it dispatch to the kernels an AVX2-only CPU runs (`jit_uni_int8:avx2`, `jit_avx2_1x1_I8`);
- MKL (torch's fp32 matmuls): `MKL_ENABLE_INSTRUCTIONS=AVX2`;
- the runner's int8 decisions: `ASR_RUNNER_CPU_FLAGS="avx2 fma"` (7-bit activations and the AVX2 depthwise
  kernel, as there).

Not capped: ONNX Runtime's MLAS (it reads CPUID itself; no cap exists) and OpenVINO's own JIT kernels
outside oneDNN (its FakeQuantize reports `jit_avx512`). The cores, clock and caches stay this CPU's, so
emulated figures compare kernels, not an AVX2 machine's speed.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

VNNI = {"avx512_vnni", "avx_vnni", "amx_int8"}
CAPS = {"ONEDNN_MAX_CPU_ISA": "AVX2", "MKL_ENABLE_INSTRUCTIONS": "AVX2"}
FLAGS = {"ASR_RUNNER_CPU_FLAGS": "avx2 fma"}


def emulate_avx2(runner_flags: bool = True) -> str:
    """Set the caps (and, with `runner_flags`, the runner's int8 flags) in this process's environment; returns
    a line saying what was set, for the benchmark's output."""
    settings = {**CAPS, **(FLAGS if runner_flags else {})}
    os.environ.update(settings)
    return "EMULATED AVX2 kind: " + ", ".join(f"{k}={v!r}" for k, v in settings.items())


def has_vnni(flags: list[str]) -> bool:
    return bool(VNNI & set(flags))


def with_engine_depthwise(data: bytes, engine: str):
    """`build_int8_model(data, engine)` with the engine's own depthwise convs instead of the runner's AVX2
    kernel (what the kernel gains, on the kind it runs on). Imports torch: call after the caps are set."""
    from runner.int8 import depthwise
    from runner.int8.artifact import build_int8_model

    applies = depthwise.applies
    depthwise.applies = lambda *_args, **_kwargs: False
    try:
        return build_int8_model(data, engine)
    finally:
        depthwise.applies = applies


def write_results(stem: str, report: dict, emulated: bool, out: Path | None = None) -> Path:
    """Write a benchmark's `report` as JSON to `out`, or to benchmarks/results/<stem>-<CPU tag>.json, the tag
    ending in -emulated-avx2 when `emulated`; print and return the path."""
    from runner.sysinfo import cpu_tag

    name = f"{stem}-{cpu_tag()}{'-emulated-avx2' if emulated else ''}.json"
    out = out or Path(__file__).resolve().parent / "results" / name
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=1, default=str))
    print(f"wrote {out}")
    return out
