"""cpu_kinds.py's printed table of one architecture: the runner's int8 facts, then speed and accuracy per system."""

from __future__ import annotations

import json
import os


def print_arch(arch: str, r: dict) -> None:
    info = r["runner_int8"]
    print(
        f"\n== {arch}: {r['model']}{' ' + r['size'] if r['size'] else ''}, {r['params'] / 1e6:.1f} M parameters, "
        f"{r['clips']} x 10 s clips, median of {r['rounds']} rounds; load {r['load_before']} -> {r['load_after']}"
    )
    if "error" in info:
        print(f"runner int8 FAILED: {info['error']}\n{info.get('traceback', '')}")
    else:
        extra = {k: info[k] for k in ("activation_bits", "bits") if k in info}
        print(
            f"runner int8: engine {info['engine']} (probe {info['probe_seconds']}), {extra or 'bits: not reported'}, "
            f"fp32 units {info['float_units']}, quantized in {info['quantize_seconds']} s"
        )
        print(f"  int8_check: {json.dumps(info.get('int8_check'), default=str)}")
    for name, kinds in r.get("openvino_kernels", {}).items():
        print(f"{name} kernels: " + ", ".join(f"{k} x{n}" for k, n in kinds.items() if not k.startswith("Reorder")))
    if r["load_at_start"] > 0.3 * (os.cpu_count() or 1):  # later load averages include this benchmark's own
        print(
            f"WARNING: the machine was busy before the benchmark started (1-min load {r['load_at_start']}); "
            "torch's OpenMP threads lose most when a core is taken (same call: 0.6 to 6.5 s here), so these "
            "speeds are not figures to quote"
        )
    speed_b1, speed_b8 = r["speed"]["b1"], r["speed"]["b8"]
    width = max(12, *(len(k) for k in speed_b1))
    print(
        f"{'system':{width}} {'batch 1 x RT: median [min-max]':>32} {'batch ' + str(speed_b8['batch']):>9} "
        f"{'x RT: median [min-max]':>22} {'cosine':>8} {'argmax':>7}"
    )
    for name in (k for k in speed_b1 if k != "batch"):
        cells = [f"{s[name]['median']:8.1f} [{s[name]['min']:.1f}-{s[name]['max']:.1f}]" for s in (speed_b1, speed_b8)]
        acc = r["accuracy"].get(name, {})
        figures = (
            f"{acc['logit_cosine']:8.4f} {acc['argmax_agreement']:7.1%}"
            if "logit_cosine" in acc
            else f"  {acc.get('error', 'reference' if name == 'lean_fp32' else '-')}"
        )
        print(f"{name:{width}} {cells[0]:>32} {cells[1]:>32} {figures}")
    print_ratios(r["speed"], r.get("emulated", False))


def print_ratios(speed: dict, emulated: bool) -> None:
    """The runner's int8 against what issue 15's targets name, per batch size: OpenVINO int8, NeMo fp32 and
    the fastest peer configuration (ratios of medians; emulated, OpenVINO's only: ONNX Runtime is not capped)."""
    peer_names = ("ov_fp32", "ov_int8") if emulated else ("ort_fp32", "ort_int8", "ov_fp32", "ov_int8")
    for b in ("b1", "b8"):
        s = {name: v["median"] for name, v in speed[b].items() if name != "batch"}
        if "runner_int8" not in s:
            return
        runner, peers = s["runner_int8"], {name: s[name] for name in peer_names if name in s}
        refs = ("ov_int8", "nemo_fp32", "runner_int8_engine_dw")
        parts = [f"{runner / s[ref]:.2f}x {ref}" for ref in refs if ref in s]
        if peers:
            fastest = max(peers, key=peers.get)
            which = "the faster OpenVINO" if emulated else "the fastest peer"
            parts.append(f"{runner / peers[fastest]:.2f}x {which} ({fastest})")
        print(f"runner int8 at batch {speed[b]['batch']}: " + ", ".join(parts))
