"""Facts about the CPU that explain throughput figures (stored in stats and reports)."""

from __future__ import annotations

import os
import platform
import re

FLAGS_THAT_MATTER = (
    "avx2",
    "fma",
    "avx512f",
    "avx512bw",
    "avx512_vnni",
    "avx_vnni",
    "avx512_bf16",
    "amx_tile",
    "amx_int8",
    "amx_bf16",
    "asimd",
    "asimddp",
    "i8mm",
    "sve",
)


CPU_FLAGS_OVERRIDE = "ASR_RUNNER_CPU_FLAGS"  # diagnostic: the flags int8 decisions use instead of /proc/cpuinfo's


def cpu_info() -> dict:
    """Model name, logical CPUs, and the SIMD flags that decide which int8 kernels are fast (as the CPU
    reports them; `int8_flags` gives the ones int8 decisions use)."""
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
    return {
        "model": model,
        "logical_cpus": os.cpu_count(),
        "machine": platform.machine(),
        "flags": [f for f in FLAGS_THAT_MATTER if f in flags],
    }


def int8_kind(flags) -> str:
    """The int8 instruction set the flags name, as the figures are labelled: amx, avx512-vnni, avx-vnni,
    avx512 (no VNNI), avx2, arm-dotprod, or the machine's bare SIMD ("other")."""
    flags = set(flags)
    for flag, kind in (
        ("amx_int8", "amx"),
        ("avx512_vnni", "avx512-vnni"),
        ("avx_vnni", "avx-vnni"),
        ("avx512bw", "avx512"),
        ("avx2", "avx2"),
        ("asimddp", "arm-dotprod"),
    ):
        if flag in flags:
            return kind
    return "other"


def cpu_tag(cpu: dict | None = None) -> str:
    """A file-name tag of the CPU model and its int8 kind, e.g. amd-epyc-avx2, amd-epyc-avx512-vnni,
    intel-xeon-platinum-8480-amx: one model name covers CPU generations whose int8 kernels differ."""
    cpu = cpu or cpu_info()
    name = re.sub(r"\((r|tm)\)|\bcpu\b|@.*$|\bprocessor\b|\d+-core", " ", cpu["model"].lower())
    model = "-".join(re.findall(r"[a-z0-9]+", name)[:4]) or cpu["machine"]
    return f"{model}-{int8_kind(cpu['flags'])}"


def int8_flags() -> list[str]:
    """The CPU flags int8 decisions read: this CPU's, or those in $ASR_RUNNER_CPU_FLAGS (space or comma
    separated), a documented diagnostic override that lets a test make a worker believe it has
    (or lacks) VNNI, so the self-check's catch and fallback can be exercised on any machine."""
    override = os.environ.get(CPU_FLAGS_OVERRIDE)
    if override is not None:
        return [f for f in override.replace(",", " ").split() if f]
    return cpu_info()["flags"]


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
