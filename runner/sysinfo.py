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


# x86 cores by CPUID family and model, where known: cloud VMs often name only "AMD EPYC", and int8 kernels'
# speed differs between the generations behind one name (llvm-mca's Zen 2 model issues one 256-bit integer
# multiply a cycle, its Zen 3 model two: docs/cpu-kinds.md)
AMD_CORES = (  # family, first model, last model, core
    (23, 0x00, 0x2F, "Zen or Zen+"),
    (23, 0x30, 0xFF, "Zen 2"),
    (25, 0x00, 0x0F, "Zen 3"),
    (25, 0x10, 0x1F, "Zen 4"),
    (25, 0x20, 0x5F, "Zen 3"),
    (25, 0x60, 0x7F, "Zen 4"),
    (25, 0xA0, 0xAF, "Zen 4"),
    (26, 0x00, 0x4F, "Zen 5"),
    (26, 0x60, 0x7F, "Zen 5"),
)
INTEL_CORES = {  # family 6 models
    63: "Haswell",
    79: "Broadwell",
    85: "Skylake, Cascade Lake or Cooper Lake",
    106: "Ice Lake",
    108: "Ice Lake",
    143: "Sapphire Rapids",
    207: "Emerald Rapids",
    173: "Granite Rapids",
}


def core_name(vendor: str, family: int, model: int) -> str | None:
    """The microarchitecture of an x86 CPU's CPUID vendor, family and model, where this table knows it."""
    if vendor == "AuthenticAMD":
        return next((core for f, lo, hi, core in AMD_CORES if f == family and lo <= model <= hi), None)
    if vendor == "GenuineIntel" and family == 6:
        return INTEL_CORES.get(model)
    return None


def cpu_info() -> dict:
    """Model name, its CPUID vendor, family and model with the core they name (x86), logical CPUs, and the
    SIMD flags that decide which int8 kernels are fast (as the CPU reports them; `int8_flags` gives the
    ones int8 decisions use)."""
    model, flags, ids = platform.processor() or platform.machine(), set(), {}
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                key = key.strip().lower()
                if key in ("model name", "cpu model") and model in ("", platform.machine(), platform.processor()):
                    model = value.strip()
                elif key in ("flags", "features") and not flags:
                    flags = set(value.split())
                elif key in ("vendor_id", "cpu family", "model") and key not in ids:
                    ids[key] = value.strip()
    except OSError:
        pass
    info = {"model": model, "logical_cpus": os.cpu_count(), "machine": platform.machine()}
    if {"vendor_id", "cpu family", "model"} <= ids.keys() and (ids["cpu family"] + ids["model"]).isdigit():
        family, number = int(ids["cpu family"]), int(ids["model"])
        info["cpuid"] = f"{ids['vendor_id']} family {family} model {number}"
        info["core"] = core_name(ids["vendor_id"], family, number)
    return {**info, "flags": [f for f in FLAGS_THAT_MATTER if f in flags]}


def cpu_label(cpu: dict | None = None) -> str:
    """The CPU as figures name it: model name, and the core where known, e.g. "AMD EPYC (Zen 5)"."""
    cpu = cpu or cpu_info()
    return cpu["model"] + (f" ({cpu['core']})" if cpu.get("core") else "")


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
