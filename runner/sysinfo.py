"""Facts about the CPU that explain throughput figures (stored in stats and reports)."""

from __future__ import annotations

import os
import platform

FLAGS_THAT_MATTER = ("avx2", "fma", "avx512f", "avx512bw", "avx512_vnni", "avx_vnni", "avx512_bf16",
                     "amx_tile", "amx_int8", "amx_bf16", "asimd", "asimddp", "i8mm", "sve")


def cpu_info() -> dict:
    """Model name, logical CPUs, and the SIMD flags that decide which int8 kernels are fast."""
    model, flags = platform.processor() or platform.machine(), set()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                key = key.strip().lower()
                if key in ("model name", "cpu model") and model in ("", platform.machine(), platform.processor()):
                    model = value.strip()
                elif key in ("flags", "features") and not flags:
                    flags = set(value.split())
    except OSError:
        pass
    return {"model": model, "logical_cpus": os.cpu_count(), "machine": platform.machine(),
            "flags": [f for f in FLAGS_THAT_MATTER if f in flags]}


def peak_rss_mb() -> float:
    """This process's peak resident memory in MB.

    Reads VmHWM, which starts afresh at exec; `ru_maxrss` would also count the parent's memory
    at fork time (a process started from a big parent reports the parent's size).
    """
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
