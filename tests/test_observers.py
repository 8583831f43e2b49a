"""First-time quantization does less work for the same result: one calibration pass for every observer
candidate, torch's histogram observer made faster bit for bit, a gate that stops only when its decision
is clear. Real model (the bundled demo QuartzNet), real espeak-ng speech."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from runner.int8.config import Settings
from runner.int8.gate import GateSet, feature_batches, wilson_upper
from runner.int8.model import calibrate, convert, prepare
from runner.int8.observers import OBSERVERS, FastHistogramObserver, use_observer
from runner.int8.samples import draw_samples, read_items

ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / "runner/data/demo_quartznet.nemo"


@pytest.fixture(scope="module")
def demo():
    from runner.model.nemo_loader import load_any

    model = load_any(DEMO)
    samples = draw_samples(str(ROOT / "manifests/demo/test.jsonl"), None, Settings(calibration_items=24, gate_items=40))
    rate = model.spec.features.sample_rate
    cal, _, _ = read_items(samples.calibration, rate, 30.0, 24)
    gate, items, _ = read_items(samples.gate, rate, 30.0, 40)
    return model, [(f, n) for f, n, _ in feature_batches(model, cal)], gate, [i.text for i in items]


def _plain(state: dict) -> dict:
    return {k: v.dequantize() if isinstance(v, torch.Tensor) and v.is_quantized else v for k, v in state.items()}


def test_one_calibration_pass_gives_each_observer_exactly_its_own_ranges(demo):
    model, batches, *_ = demo
    every = prepare(model, "all")
    calibrate(every, batches)
    for name in OBSERVERS:
        alone = prepare(model, name)
        calibrate(alone, batches)
        use_observer(every, name)
        a, b = _plain(convert(every, "onednn").state_dict()), _plain(convert(alone, "onednn").state_dict())
        assert a.keys() == b.keys()
        differ = [k for k in a if isinstance(a[k], torch.Tensor) and not torch.equal(a[k], b[k])]
        assert not differ, f"{name}: {differ[:5]}"
    # the candidates do differ from one another, so the comparison above can tell them apart
    use_observer(every, "minmax")
    mm = _plain(convert(every, "onednn").state_dict())
    use_observer(every, "histogram")
    hist = _plain(convert(every, "onednn").state_dict())
    assert any(not torch.equal(mm[k], hist[k]) for k in mm if k.endswith("scale"))


def test_fast_histogram_observer_is_torchs_bit_for_bit_on_real_activations(demo):
    from torch.ao.quantization import HistogramObserver

    model, batches, *_ = demo
    observed = prepare(model, "histogram")
    pairs = []
    for module in observed.modules():
        if isinstance(module, FastHistogramObserver):
            twin = HistogramObserver(reduce_range=False)
            module.register_forward_pre_hook(lambda _m, args, twin=twin: twin(args[0]))
            pairs.append((module, twin))
    assert len(pairs) > 10
    calibrate(observed, batches)
    for fast, torchs in pairs:
        assert torch.equal(fast.histogram, torchs.histogram)
        assert torch.equal(fast.min_val, torchs.min_val) and torch.equal(fast.max_val, torchs.max_val)
        assert all(torch.equal(a, b) for a, b in zip(fast.calculate_qparams(), torchs.calculate_qparams()))


def test_fast_histogram_search_matches_torch_on_outliers_and_narrow_ranges():
    from torch.ao.quantization import HistogramObserver

    torch.manual_seed(0)
    for trial in range(12):
        fast, torchs = FastHistogramObserver(reduce_range=False), HistogramObserver(reduce_range=False)
        for k in range(4):
            x = torch.randn(4, 32, 200) * (k + 1)
            if trial % 3 == 1:
                x = torch.relu(x) ** 2  # heavy right tail, a spike at 0
            if trial % 3 == 2:
                x[0, 0, :2] = 60.0 * (k + 1)  # outliers the search should clip
            if trial == 11:
                x = torch.full((4, 8), 0.5)  # one value: histc's own rule for an empty range
            fast(x)
            torchs(x)
        assert torch.equal(fast.histogram, torchs.histogram)
        assert all(torch.equal(a, b) for a, b in zip(fast.calculate_qparams(), torchs.calculate_qparams()))


def test_wilson_bound():
    assert wilson_upper(0, 0) == 1.0
    assert 0.004 < wilson_upper(0, 600) < 0.005 < wilson_upper(0, 500)  # 0 disagreements: ~540 words needed
    assert wilson_upper(3, 600) > 3 / 600
    assert wilson_upper(10, 100) < wilson_upper(10, 50)


def test_gate_reads_on_while_its_decision_is_unclear_and_keeps_per_candidate_results(demo):
    model, _, gate_audio, references = demo
    gate = GateSet(model, gate_audio, references, chunks=4)
    assert gate.read == 1 and len(gate.chunks) == 4
    first_words = sum(len(gate.references[i].split()) for i in gate.ids)
    fp32_run = model.logits
    figures = gate.score(fp32_run, key="fp32")
    assert figures["wer_vs_fp32"] == 0 and figures["_edits_vs_fp32"] == 0
    # 0 disagreements in a quarter of 40 short utterances is not enough words for a 0.5-point limit ...
    assert first_words < 500 and not gate.clear_pass(figures, 0.005)
    # ... it is for a 5-point one
    assert gate.clear_pass(figures, 0.05)
    gate.read_all()
    assert gate.complete and len(gate.ids) == len(gate_audio)
    again = gate.score(fp32_run, key="fp32")  # only the new batches run; same figures as scoring afresh
    afresh = gate.score(fp32_run)
    assert again == afresh and again["logit_error"] == 0


def test_self_check_reference_is_the_gates_own_fp32_output(demo):
    model, _, gate_audio, references = demo
    gate = GateSet(model, gate_audio, references, chunks=2)
    ref = gate.reference(4, 20.0)
    assert 1 <= len(ref["frames"]) <= 4 and ref["seconds"] <= 20.0
    with torch.inference_mode():
        logits, lens = model.logits(ref["features"], ref["frames"])
    assert torch.equal(lens, ref["lengths"])
    assert torch.allclose(logits, ref["logits"], atol=1e-4, rtol=1e-4)
