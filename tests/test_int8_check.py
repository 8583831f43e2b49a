"""The per-CPU int8 rule and the self-check every worker runs before it transcribes (issue 15).

The saturating kernels are real, never simulated: on a CPU without VNNI they are this CPU's; on
one with VNNI, oneDNN is capped to AVX2 (`ONEDNN_MAX_CPU_ISA`, read when oneDNN loads, so in a
subprocess) and reports the ISA it dispatches to, which decides what the test expects. The
diagnostic override `ASR_RUNNER_CPU_FLAGS` makes a worker believe it has VNNI, so it first tries
8-bit activations where they saturate: the self-check must catch it and 7 bits must repair it.
"""

import json
import os
import re
import subprocess
import sys

import pytest
import torch

from runner.int8 import direct
from runner.int8.artifact import Artifact, Int8CheckFailed, build_int8_model
from runner.int8.config import Settings
from runner.int8.depthwise import library as depthwise_library
from runner.int8.engines import VNNI_FLAGS, available_engines
from runner.int8.pipeline import quantize_model
from runner.job.worker import Int8Payload, ShardWorker
from runner.model.ctc import build_model
from runner.model.nemo_loader import describe
from runner.model.transcribe import DecodeOptions, transcribe_batch
from runner.sysinfo import cpu_info, int8_flags
from runner.training.corpus import sentences, synthesize_many

from .support import direct_vs_modules, pinned_engine

CLAIMS_VNNI = "avx2 fma avx512_vnni"  # what the override makes a worker believe
# What the runner's int8 decisions read (the CPU's flags, or $ASR_RUNNER_CPU_FLAGS when the whole suite runs as
# the AVX2 kind on another CPU: docs/cpu-kinds.md, "The suite as the AVX2 kind").
HAS_VNNI = bool(VNNI_FLAGS & set(int8_flags()))
# oneDNN capped below its VNNI kernels ($ONEDNN_MAX_CPU_ISA, read when it loads): its int8 kernels saturate then
ONEDNN_CAPPED = os.environ.get("ONEDNN_MAX_CPU_ISA", "").upper() in ("SSE41", "AVX", "AVX2", "AVX512_CORE")


@pytest.fixture(scope="module")
def qn15():
    """QuartzNet15x5 (random weights, randomized BN: wide activation ranges, so 8-bit activations
    saturate without VNNI) and a one-observer artifact calibrated on 6 utterances."""
    from runner.training.recipes import build_nemo_model, quartznet15x5_config, randomize_batchnorm

    torch.manual_seed(0)
    nemo = build_nemo_model(quartznet15x5_config())
    randomize_batchnorm(nemo)
    lean = build_model(*describe(nemo))
    audio = [a for _t, _v, a in synthesize_many(sentences(10, seed=21), seed=21)]
    settings = Settings(observers=("minmax",), max_wer_increase=1.0, max_fp32_layers=0, engine=pinned_engine())
    art = quantize_model(lean, audio[:6], audio[6:], None, settings)  # random weights: no references
    return lean, art, audio


def test_the_driver_gates_and_records_what_workers_check_against(qn15):
    _lean, art, _audio = qn15
    report, reference = art.report, art.reference
    assert report["activation_bits"] == (8 if HAS_VNNI else 7)
    assert set(reference["expected"]) == ({8, 7} if HAS_VNNI else {7})
    assert len(reference["frames"]) >= 1 and 5 <= reference["seconds"] <= 20
    assert reference["logits"].shape[0] == reference["features"].shape[0] == len(reference["lengths"])
    for figures in reference["expected"].values():
        assert figures["logit_cosine"] >= 0.999 and figures["frame_agreement"] >= 0.99  # issue 15's targets


def _build_in_subprocess(data_path, engine, env_extra) -> tuple[dict, str]:
    code = (
        "import json, sys\n"
        "from runner.int8.artifact import build_int8_model\n"
        f"loaded = build_int8_model(open({str(data_path)!r}, 'rb').read(), {engine!r})\n"
        "print('RESULT ' + json.dumps(loaded.int8_check))\n"
    )
    env = {**os.environ, **env_extra}
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, env=env)
    assert run.returncode == 0, run.stderr[-3000:]
    result = next(line for line in run.stdout.splitlines() if line.startswith("RESULT "))
    isa = next((line for line in run.stdout.splitlines() if ",isa:" in line), "")
    return json.loads(result[len("RESULT ") :]), isa


@pytest.mark.skipif("onednn" not in available_engines(), reason="this torch build has no onednn engine")
def test_saturating_onednn_kernels_are_caught_and_repaired(qn15, tmp_path):
    """8-bit activations on oneDNN's AVX2 kernels (this CPU's without VNNI; capped to them with VNNI)."""
    _lean, art, _audio = qn15
    path = tmp_path / "qn15.int8"
    path.write_bytes(art.to_bytes())
    check, isa = _build_in_subprocess(
        path, "onednn", {"ONEDNN_MAX_CPU_ISA": "AVX2", "ONEDNN_VERBOSE": "1", "ASR_RUNNER_CPU_FLAGS": CLAIMS_VNNI}
    )
    first, last = check["attempts"][0], check["attempts"][-1]
    print(
        f"oneDNN dispatched to: {isa}; "
        f"attempts: {[(a['activation_bits'], a['logit_cosine']) for a in check['attempts']]}"
    )
    assert isa, "oneDNN did not report its ISA (ONEDNN_VERBOSE)"
    assert first["activation_bits"] == 8  # the override made the worker believe it has VNNI
    if "DL Boost" in isa or "AMX" in isa or "VNNI" in isa:  # the cap did not take: int32 accumulation
        assert first["passed"] and check["fallback"] is None
    else:  # AVX2 kernels: u8 x s8 pairs saturate in int16
        assert not first["passed"] and first["logit_cosine"] < 0.99, first
        assert last["activation_bits"] == 7 and last["passed"] and check["fallback"] == "7-bit activations"
        assert last["logit_cosine"] >= 0.999 and last["frame_agreement"] >= 0.99


@pytest.mark.parametrize("engine", [e for e in ("x86", "fbgemm") if e in available_engines()])
def test_fbgemm_kernels_follow_the_cpu(qn15, engine, monkeypatch):
    """fbgemm has no ISA cap: its saturating kernels run only on a CPU without VNNI, where the check must
    catch the 8-bit claim; with VNNI, 8 bits must pass as they are. The x86 engine also runs convs on oneDNN,
    whose kernels saturate where its ISA is capped below VNNI."""
    _lean, art, _audio = qn15
    kernels_vnni = bool(VNNI_FLAGS & set(cpu_info()["flags"])) and not (engine == "x86" and ONEDNN_CAPPED)
    monkeypatch.setenv("ASR_RUNNER_CPU_FLAGS", CLAIMS_VNNI)
    check = build_int8_model(art.to_bytes(), engine).int8_check
    first, last = check["attempts"][0], check["attempts"][-1]
    assert first["activation_bits"] == 8
    if kernels_vnni:
        assert first["passed"] and check["fallback"] is None
    else:
        assert not first["passed"] and first["logit_cosine"] < 0.99, first
        assert last["passed"] and last["activation_bits"] == 7 and check["fallback"] == "7-bit activations"


def test_every_engine_passes_with_the_bits_its_cpu_gets(qn15):
    _lean, art, _audio = qn15
    for engine in [e for e in available_engines() if e != "qnnpack"]:  # qnnpack: ~7 GB on this model
        check = build_int8_model(art.to_bytes(), engine).int8_check
        assert check["passed"] and check["fallback"] is None, (engine, check)
        assert check["logit_cosine"] >= 0.999 and check["frame_agreement"] >= 0.99, (engine, check)


def _broken(art: Artifact) -> bytes:
    """The artifact with its reference logits replaced: int8 that matches them at no width, as an engine
    whose int8 is wrong whatever the activations would be."""
    reference = dict(art.reference)
    reference["logits"] = torch.roll(reference["logits"], shifts=1, dims=1)  # every frame's argmax moves
    return Artifact(art.spec, art.features, art.int8, art.float_units, art.recipe, art.report, reference).to_bytes()


def test_worker_falls_back_to_fp32_loudly_or_stops_the_job(qn15, caplog):
    from io import BytesIO

    from runner.model.ctc import save_checkpoint

    lean, art, audio = qn15
    buf = BytesIO()
    save_checkpoint(lean.spec, lean.state_dict(), buf)
    payload = Int8Payload(
        _broken(art), "auto", on_check_failure="fp32", fp32_checkpoint=lambda: buf.getvalue()
    )  # Ray gives the worker a callable that fetches it
    worker = ShardWorker(payload, threads=2, options=DecodeOptions())
    check = worker.info()["int8_check"]
    assert worker.engine == "fp32" and check["fallback"] == "fp32 model" and not check["passed"]
    assert [a["activation_bits"] for a in check["attempts"]][-1] == 7  # 7 bits were tried before fp32
    assert "RUNS THE fp32 MODEL" in caplog.text
    texts = transcribe_batch(worker.model, audio[:2])
    assert texts == transcribe_batch(lean, audio[:2])  # the fp32 model's own transcripts
    with pytest.raises(Int8CheckFailed, match="on_check_failure is stop"):
        ShardWorker(
            Int8Payload(payload.artifact, "auto", "stop", payload.fp32_checkpoint), threads=2, options=DecodeOptions()
        )


def test_figures_name_the_core_behind_a_generic_model_name():
    from runner.sysinfo import core_name, cpu_info, cpu_label

    assert core_name("AuthenticAMD", 23, 0x31) == "Zen 2"  # EPYC 7002 (Rome)
    assert core_name("AuthenticAMD", 25, 0x01) == "Zen 3"  # EPYC 7003 (Milan)
    assert core_name("AuthenticAMD", 25, 0x11) == "Zen 4"  # EPYC 9004 (Genoa)
    assert core_name("AuthenticAMD", 26, 0x02) == "Zen 5"  # EPYC 9005 (Turin)
    assert core_name("GenuineIntel", 6, 207) == "Emerald Rapids"
    assert core_name("GenuineIntel", 6, 1) is None and core_name("AuthenticAMD", 25, 0x90) is None
    assert cpu_label({"model": "AMD EPYC", "core": "Zen 2"}) == "AMD EPYC (Zen 2)"
    assert cpu_label({"model": "Graviton", "core": None}) == "Graviton"
    cpu = cpu_info()
    if cpu["machine"] == "x86_64":  # Linux x86 reports vendor, family and model in /proc/cpuinfo
        assert re.fullmatch(r"\w+ family \d+ model \d+", cpu["cpuid"]), cpu


def test_figures_are_labelled_with_the_int8_kind_the_flags_name():
    from runner.sysinfo import cpu_tag, int8_kind

    assert int8_kind(["avx", "avx2", "fma"]) == "avx2"
    assert int8_kind(["avx2", "avx512f", "avx512bw"]) == "avx512"  # AVX-512 without VNNI: saturating pairs
    assert int8_kind(["avx2", "avx512bw", "avx512_vnni"]) == "avx512-vnni"
    assert int8_kind(["avx2", "avx_vnni"]) == "avx-vnni"
    assert int8_kind(["avx512_vnni", "amx_tile", "amx_int8"]) == "amx"
    assert int8_kind(["asimd", "asimddp"]) == "arm-dotprod" and int8_kind([]) == "other"
    epyc = {"model": "AMD EPYC 9B45 128-Core Processor", "machine": "x86_64", "flags": ["avx2", "fma"]}
    assert cpu_tag(epyc) == "amd-epyc-9b45-avx2"


@pytest.mark.skipif(
    not ({"avx2", "fma"} <= set(cpu_info()["flags"]) and depthwise_library() is not None),
    reason="the AVX2 depthwise kernel runs on x86 CPUs with AVX2 and FMA",
)
def test_only_the_avx2_kind_runs_our_depthwise_kernel(qn15, monkeypatch):
    """CPUs without VNNI (here claimed by the override where the CPU has it) run the conv family's depthwise
    convs on our AVX2 kernel, self-checked like the rest; with VNNI the engine's kernel stays. Both builds
    of the same artifact agree, and the swapped model saves the engine's state dict."""
    from runner.int8.depthwise import DepthwiseConv1d

    _lean, art, audio = qn15
    built = {}
    for flags in (CLAIMS_VNNI, "avx2 fma"):
        monkeypatch.setenv("ASR_RUNNER_CPU_FLAGS", flags)
        built[flags] = build_int8_model(art.to_bytes(), "onednn")
    ours, engines = built["avx2 fma"], built[CLAIMS_VNNI]
    worker = ShardWorker(Int8Payload(art.to_bytes(), "onednn"), threads=1, options=DecodeOptions())  # as in a job
    assert worker.info()["int8_check"]["depthwise_convs"] == "runner-avx2"
    worker.model.qencoder.direct = False  # kernels against kernels: on the modules, ties stay ties
    ours_texts = transcribe_batch(worker.model, audio[:3])
    swapped = [m for m in ours.model.qencoder.modules() if isinstance(m, DepthwiseConv1d)]
    assert ours.int8_check["depthwise_convs"] == "runner-avx2" and ours.int8_check["activation_bits"] == 7
    assert len(swapped) == 15 * 5 + 2  # every depthwise conv: the blocks', the strided first and dilated last
    assert ours.int8_check["passed"] and ours.int8_check["logit_cosine"] >= 0.999
    assert engines.int8_check["depthwise_convs"] == "onednn"
    assert not any(isinstance(m, DepthwiseConv1d) for m in engines.model.qencoder.modules())
    # the same artifact at 7 bits with the engine's depthwise convs: the same logits but for rounding ties
    monkeypatch.setattr("runner.int8.depthwise.applies", lambda engine, cpu_flags=None: False)
    monkeypatch.setenv("ASR_RUNNER_CPU_FLAGS", "avx2 fma")
    plain = build_int8_model(art.to_bytes(), "onednn")
    ours.model.qencoder.direct = plain.model.qencoder.direct = False
    feats, frames = art.reference["features"], art.reference["frames"]
    a, b = ours.model.logits(feats, frames)[0], plain.model.logits(feats, frames)[0]
    assert float(torch.nn.functional.cosine_similarity(a, b, dim=1).mean()) >= 0.99999
    assert ours_texts == transcribe_batch(plain.model, audio[:3]) and all(ours_texts), ours_texts
    assert ours.model.qencoder.state_dict().keys() == plain.model.qencoder.state_dict().keys()


@pytest.mark.skipif(not direct.applies("onednn"), reason="oneDNN's int8 ops are called directly on x86 builds of torch")
def test_the_direct_int8_forward_agrees_with_the_modules(qn15, monkeypatch):
    """QuartzNet15x5 int8 on onednn runs `runner.int8.direct` (uint8 tensors, oneDNN called directly) with
    oneDNN's depthwise convs and, on the AVX2 kind (claimed by the override where the CPU has VNNI), with our
    kernel. Against the modules on a padded batch: the residual adds are fused into the convs (one rounding
    instead of two, and no clamp of the branch's own output), so logits may differ by a few steps; they are
    as close to fp32's as the modules' are."""
    lean, art, audio = qn15
    kinds = [CLAIMS_VNNI] + (["avx2 fma"] if depthwise_library() is not None else [])
    for flags in kinds:
        monkeypatch.setenv("ASR_RUNNER_CPU_FLAGS", flags)
        built = build_int8_model(art.to_bytes(), "onednn")
        assert built.int8_check["passed"]
        figures = direct_vs_modules(built, audio[:4], lean)
        assert figures["cosine"] >= 0.999 and figures["worst_frame_cosine"] >= 0.995, (flags, figures)
        assert figures["argmax"] >= 0.99 and figures["steps"] <= 16, (flags, figures)
        assert figures["direct_vs_fp32"] >= figures["modules_vs_fp32"] - 1e-4, (flags, figures)  # as accurate


def test_the_modules_run_where_the_direct_forward_does_not_apply(qn15, monkeypatch):
    """Another engine, a unit kept in fp32, or the diagnostic switch: the quantized modules run."""
    _lean, art, _audio = qn15
    others = [e for e in available_engines() if e != "onednn"]
    if others:
        assert not build_int8_model(art.to_bytes(), others[0]).model.qencoder.direct
    monkeypatch.setenv(direct.SWITCH, "0")
    assert not build_int8_model(art.to_bytes(), "onednn").model.qencoder.direct
    monkeypatch.delenv(direct.SWITCH)
    if direct.applies("onednn"):
        from runner.int8.model import load_int8

        qenc = load_int8(art.spec, art.int8, "onednn")
        qenc.float_units = frozenset({1})  # as the gate's hybrids have them
        assert qenc.direct and direct.plan_for(qenc) is None  # not covered: the modules run
