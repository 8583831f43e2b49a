"""int8 engines: which exist, which `auto` considers, how they are timed, and the activation bits
each needs on this CPU.

One list of engines (`ENGINES`, also `auto`'s preference order on near-ties), one place that decides
activation bits from the CPU's flags (`activation_bits`), one probe (`time_engines`) and one choice
(`choose_engine`) used by the driver and by every worker (`runner.int8.artifact.resolve_engine`).

Without VNNI, x86 int8 kernels (oneDNN, fbgemm) multiply u8 x s8 pairs into int16 with saturation
(vpmaddubsw), and full-range 8-bit activations overflow it (QuartzNet15x5 on an AVX2-only EPYC:
logit cosine 0.80, 0% of frames agree with fp32). There, activations use 7 bits, which cannot
overflow (2 x 127 x 128 < 2^15): cosine 0.9997, 100% agreement. VNNI/AMX (int32 accumulation) and
qnnpack keep 8 bits.
"""

from __future__ import annotations

import json
import os
import platform
import time
from collections.abc import Callable, Sequence
from contextlib import contextmanager

import torch

from runner.errors import InputError
from runner.int8.config import ENGINES
from runner.model.arch import ModelSpec
from runner.sysinfo import cpu_info, int8_flags

TIE_MARGIN = 0.10  # probes closer than this to the fastest count as ties


@contextmanager
def engine_scope(engine: str):
    """Use a quantized engine for a block of work, restoring the previous one after."""
    previous = torch.backends.quantized.engine
    torch.backends.quantized.engine = engine
    try:
        yield
    finally:
        torch.backends.quantized.engine = previous


def available_engines() -> list[str]:
    """The engines of `ENGINES` this torch build has, in our preference order."""
    have = set(torch.backends.quantized.supported_engines)
    return [e for e in ENGINES if e in have]


def check_engine(engine: str) -> None:
    if engine not in ENGINES:
        raise ValueError(f"engine must be one of auto, {', '.join(ENGINES)}; got {engine!r}")
    if engine not in torch.backends.quantized.supported_engines:
        raise ValueError(
            f"engine {engine!r} is not available in this torch build (available: {', '.join(available_engines())})"
        )


def probe_frames(spec: ModelSpec) -> int:
    """Feature frames `auto` times each engine on: 2 s for the conv family, 10 s for Conformers.

    Short probes misrank engines whose cost per call does not shrink with the input. On an AMD EPYC with
    AVX-512 VNNI, onednn's QuartzNet15x5 took 0.135 s per second of audio on a 0.5 s probe, 0.0077 on
    2 s and 0.0030 on 10 s (kernels of 33-87 frames over a few dozen); fbgemm took 0.32-0.33 on all
    three. On Citrinet-256 the 0.5 s probe put onednn only 1.8x ahead of fbgemm (25x on 10 s), and on a
    busy machine it chose fbgemm: int8 then ran at 15x real time instead of ~450x. A Conformer sees only
    ~6 frames of 0.5 s after 8x subsampling, too few to rank its int8 matmuls (on FastConformer-CTC large
    a 0.5 s probe put `x86` first, while `onednn` is the fastest on 10 s utterances), so Conformers
    probe 10 s."""
    return 1000 if spec.family == "conformer-ctc" else 200


PROBE_REVISION = 2  # in `choice_key`: choices an earlier probe made (0.5 s for the conv family) are probed again


VNNI_FLAGS = frozenset({"avx512_vnni", "avx_vnni", "amx_int8"})  # u8 x s8 products accumulate in int32
X86_MACHINES = frozenset({"x86_64", "amd64", "i386", "i686"})


# What `activation_bits` gives each kind of CPU (printed by `asr-runner quantize`).
BITS_BY_CPU_KIND = (
    ("x86 with AVX-512 VNNI, AVX-VNNI or AMX: onednn, x86, fbgemm", 8),
    ("x86 without VNNI (AVX2; AVX-512 without VNNI): onednn, x86, fbgemm", 7),
    ("qnnpack (ARM; x86 only when no other engine exists)", 8),
)


def activation_bits(engine: str, cpu_flags: Sequence[str] | None = None) -> int:
    """Activation bits for `engine` on this CPU: 7 where its int8 products can saturate, else 8.

    onednn, x86 and fbgemm on an x86 CPU without VNNI/AMX add pairs of u8 x s8 products into int16
    with saturation: 7 bits. With VNNI or AMX they accumulate in int32, and so does qnnpack: 8 bits.
    Decided from the CPU's flags (`sysinfo.int8_flags`, which a diagnostic override can replace);
    every worker then confirms it by measurement (`runner.int8.self_check`).
    """

    flags = set(int8_flags() if cpu_flags is None else cpu_flags)
    if engine == "qnnpack" or flags & VNNI_FLAGS or platform.machine().lower() not in X86_MACHINES:
        return 8
    return 7


BF16_FLAGS = frozenset({"avx512_bf16", "amx_bf16"})  # bf16 dot products in hardware


def attention_dtype(cpu_flags: Sequence[str] | None = None) -> torch.dtype:
    """The operand type of a Conformer's attention matmuls in an int8 model on this CPU: bf16 where the CPU
    multiplies bf16 natively (AVX-512 BF16, AMX-BF16), as OpenVINO's int8 runs its float parts there;
    fp32 elsewhere (without those flags bf16 is emulated, slower than fp32). Softmax and the rest stay fp32.

    Measured on an AMD EPYC with avx512_bf16 (`benchmarks/attention_precision.py`: FastConformer-CTC large
    int8 on onednn, 2 threads): 1.16x at batch 8 x 10 s, 1.01x for one utterance; logit cosine to fp32 the
    same to 4 decimals. Every worker's self-check measures the model as it runs, this included; the
    driver's gate uses the same rule.
    """
    flags = set(int8_flags() if cpu_flags is None else cpu_flags)
    if flags & BF16_FLAGS and platform.machine().lower() in X86_MACHINES:
        return torch.bfloat16
    return torch.float32


@torch.inference_mode()
def time_engines(
    build: Callable[[str], Callable[[torch.Tensor, torch.Tensor], object]],
    feat_in: int,
    engines: Sequence[str],
    frames_per_second: float = 100.0,
    frames: int = 50,
    rounds: int = 3,
    budget_seconds: float = 0.3,
) -> dict[str, float]:
    """Seconds each engine needs per second of audio, probed on `frames` feature frames (`probe_frames`).

    `build(engine)` returns a callable(feats, lens). Engines are tried one at a time in preference
    order and each is released before the next is built (peak memory = one engine's, not all of
    them: qnnpack's buffers alone can be hundreds of MB). Each first runs a short pass (16 frames)
    that absorbs first-call set-up; one whose short pass takes over 10x the fastest short pass so
    far is recorded at that time, scaled to `frames` (an estimate), and dropped: a slow engine costs
    one short pass. (Comparing it with the others' full probes instead made a long probe drop fast
    engines: a few ms of set-up x frames / 16.) The others run one untimed pass at the probe's shape (kernels
    are set up per shape); one whose untimed pass takes over 3x the best timed pass so far is recorded at
    that time (set-up included: it only overstates a loser) and dropped. The rest run up to `rounds` timed
    passes within their share of `budget_seconds`; the best pass counts.
    """
    torch.manual_seed(0)
    feats, lens = torch.randn(1, feat_in, frames), torch.tensor([frames])
    short, short_lens = feats[:, :, :16], torch.tensor([16])
    timings: dict[str, float] = {}
    shorts: dict[str, float] = {}  # short passes are compared with short passes (both pay first-call set-up)
    for engine in engines:
        with engine_scope(engine):
            run = build(engine)
            t0 = time.perf_counter()
            run(short, short_lens)
            shorts[engine] = time.perf_counter() - t0
            if len(shorts) > 1 and shorts[engine] > 10 * min(shorts.values()):
                timings[engine] = shorts[engine] * frames / 16  # an estimate: it is not probed further
                del run
                continue
            t0 = time.perf_counter()
            run(feats, lens)
            untimed = time.perf_counter() - t0
            if timings and untimed > 3 * min(timings.values()):
                timings[engine] = untimed  # set-up included: an overestimate of an engine that has lost
                del run
                continue
            passes: list[float] = []
            while len(passes) < rounds and sum(passes) < budget_seconds / len(engines):
                t0 = time.perf_counter()
                run(feats, lens)
                passes.append(time.perf_counter() - t0)
            timings[engine] = min(passes)
            del run
    audio_seconds = frames / frames_per_second
    return {e: t / audio_seconds for e, t in timings.items()}


def choose_engine(timings: dict[str, float], tie: float = TIE_MARGIN) -> str:
    """The engine `auto` keeps: the first in `ENGINES` order whose probe is within `tie` of the fastest.

    A 0.5 s probe on a busy machine can put a slow engine a few percent ahead (qnnpack once beat
    onednn 0.028 s to 0.029 s under load, then ran real shards several times slower with 3x the
    memory); near-ties go to the engine that is fastest on long inputs here, onednn."""
    best = min(timings.values())
    return next(e for e in sorted(timings, key=ENGINES.index) if timings[e] <= best * (1 + tie))


def candidate_engines(spec: ModelSpec | None = None) -> list[str]:
    """Engines `auto` considers on this CPU for `spec`'s model: every x86 engine this torch has (each with
    the activation bits this CPU needs, so none of them saturates); for the conv family, onednn alone
    where it exists.

    qnnpack is the fallback only, when none of the others is available: its buffers grow with
    kernel size x input length (~7 GB for ONE 10 s utterance of QuartzNet15x5, and the driver
    was OOM-killed at 23 GB when a busy machine's 0.5 s probe had put qnnpack ahead and the
    accuracy gate then ran 30 s utterances on it), which a short probe cannot see.

    The conv family's depthwise convolutions have 1-D kernels of 11-87 taps, for which fbgemm (and x86,
    which hands these convs to fbgemm) has no fast kernel. onednn was faster on every CPU kind measured:
    QuartzNet15x5 10x (Intel Xeon, AVX-512 VNNI + AMX), 7x (AMD EPYC, AVX2) and 40-100x (AMD EPYC, AVX-512
    VNNI); Citrinet-256 1.4-2.2x and 25x on the two EPYCs. Probing them cost a worker's first start
    2-5 s, and once, on a busy machine, picked fbgemm (15x slower). Conformers' int8 Linears are near-ties
    across engines, so they are probed.
    """
    engines = available_engines()
    found = [e for e in engines if e != "qnnpack"] or engines
    if spec is not None and spec.family == "conv-ctc" and "onednn" in found:
        return ["onednn"]
    return found


def resolve_engine(
    engine: str, build: Callable[[str], Callable] | None = None, spec: ModelSpec | None = None
) -> tuple[str, dict[str, float]]:
    """The engine that `engine` (a spec's or a flag's value) means on this CPU, with the probe timings
    behind an `auto` choice ({} otherwise). The one place engines are resolved, driver and workers alike.

    A named engine must exist in this torch build (`InputError` naming the ones that do). `auto` considers
    `candidate_engines(spec)`: with `build` (engine -> callable(feats, lens)) and `spec`, each candidate is
    timed here and the fastest kept, near-ties going to the preferred one (what every worker does); without,
    the first in preference order, untimed (the driver's accuracy gate: onednn where it exists, the fastest
    on long inputs on both CPU kinds measured; a probe cost 2.7 s on QuartzNet15x5 to 4.8 s on
    FastConformer-CTC large, and on near-ties its pick followed timing noise, which made the artifact
    differ from run to run).
    """
    if engine != "auto":
        try:
            check_engine(engine)
        except ValueError as exc:
            raise InputError(str(exc)) from None
        return engine, {}
    candidates = candidate_engines(spec)
    if build is None or spec is None or len(candidates) == 1:
        return candidates[0], {}
    timings = time_engines(
        build,
        spec.encoder.feat_in,
        candidates,
        spec.features.sample_rate / spec.features.hop_length,
        frames=probe_frames(spec),
    )
    return choose_engine(timings), timings


# ------------------------------------------------------------------ `auto`'s choice, remembered per node
CHOICES_FILE = "engine-choices.json"  # in the int8 cache folder (`runner.int8.cache.cache_dir`) of each node


def choice_key(model: str, spec: ModelSpec | None = None) -> str:
    """Where `auto`'s choice for `model` (an artifact's sha256, of a `spec` model) holds: this CPU, its int8
    flags, torch, the thread count and the candidates."""
    return (
        f"{model}|{cpu_info()['model']}|{'+'.join(int8_flags())}|torch {torch.__version__}"
        f"|threads={torch.get_num_threads()}|{','.join(candidate_engines(spec))}|probe {PROBE_REVISION}"
    )


def _choices_path():
    from runner.int8.cache import cache_dir

    return cache_dir() / CHOICES_FILE


def remembered_choice(key: str) -> tuple[str, dict[str, float]] | None:
    """(engine, the probe's timings) that `auto` chose before for `key` on this node, if any."""
    try:
        entry = json.loads(_choices_path().read_text()).get(key)
        if entry and entry["engine"] in available_engines():
            return entry["engine"], {k: float(v) for k, v in entry["seconds"].items()}
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        pass  # no file, or one this code cannot read: probe again
    return None


def remember_choice(key: str, engine: str, timings: dict[str, float]) -> None:
    """Add `auto`'s choice for `key` to this node's file (atomically; best effort: a failure only means
    the next start probes again)."""
    path = _choices_path()
    try:
        try:
            known = json.loads(path.read_text())
            known = known if isinstance(known, dict) else {}
        except (OSError, ValueError):
            known = {}
        known[key] = {"engine": engine, "seconds": timings, "probed": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(known, indent=1))
        os.replace(tmp, path)
    except OSError:
        pass
