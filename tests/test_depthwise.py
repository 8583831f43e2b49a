"""The AVX2 int8 depthwise kernel (`runner/int8/depthwise.py`, `_depthwise.c`) against the engine's own.

The kernel runs natively on any x86 CPU with AVX2, so these tests compare real outputs on every such
machine; which CPUs use it in a job (`applies`) is tested with the flags override in test_int8_check.py.
"""

import copy
import platform

import pytest
import torch
import torch.ao.nn.quantized as nnq

from runner.int8 import depthwise
from runner.int8.engines import available_engines, engine_scope
from runner.sysinfo import cpu_info

X86_AVX2 = platform.machine().lower() in ("x86_64", "amd64") and {"avx2", "fma"} <= set(cpu_info()["flags"])
needs_kernel = pytest.mark.skipif(not X86_AVX2, reason="the kernel is for x86 CPUs with AVX2 and FMA")
ENGINE = "onednn" if "onednn" in available_engines() else available_engines()[0]


def test_the_kernel_is_built_and_loads_on_x86_with_avx2():
    """`pip install` compiles it; a missing or broken build must fail here, not silently fall back."""
    if X86_AVX2:
        assert depthwise.library() is not None
    else:
        assert not depthwise.applies(ENGINE)


def _engine_conv(channels: int, kernel: int, bias: bool, seed: int, stride=1, dilation=1, padding=None) -> nnq.Conv1d:
    g = torch.Generator().manual_seed(seed)
    padding = dilation * (kernel // 2) if padding is None else padding
    conv = nnq.Conv1d(
        channels, channels, kernel, stride=stride, padding=padding, dilation=dilation, groups=channels, bias=bias
    )
    scales = torch.rand(channels, generator=g, dtype=torch.double) * 0.02 + 0.001
    w = torch.quantize_per_channel(
        torch.randn(channels, 1, kernel, generator=g) * 0.5,
        scales,
        torch.zeros(channels, dtype=torch.long),
        0,
        torch.qint8,
    )
    conv.set_weight_bias(w, torch.randn(channels, generator=g) if bias else None)
    conv.scale, conv.zero_point = 0.07, 41
    return conv


@needs_kernel
@pytest.mark.parametrize(
    "channels, kernel, frames, batch, geometry",
    [
        (8, 1, 7, 1, {}),
        (8, 3, 1, 2, {}),
        (16, 5, 2, 1, {}),
        (64, 33, 500, 1, {}),
        (256, 33, 41, 3, {}),
        (512, 87, 300, 2, {}),
        (40, 13, 29, 5, {}),
        (64, 33, 1001, 1, {"stride": 2}),  # QuartzNet's first conv
        (256, 11, 37, 2, {"stride": 2}),  # Citrinet's downsampling convs: odd and even lengths
        (256, 25, 38, 2, {"stride": 2}),
        (16, 7, 20, 1, {"stride": 3}),
        (512, 87, 300, 2, {"dilation": 2}),  # QuartzNet's last
        (24, 9, 5, 3, {"dilation": 3}),  # shorter than the dilated kernel
        (32, 4, 17, 2, {"padding": 1}),  # even kernel, padding not K // 2
        (32, 6, 30, 1, {"stride": 2, "dilation": 2, "padding": 0}),
    ],
)
@pytest.mark.parametrize("bias", [True, False])
def test_outputs_match_the_engines_depthwise_conv(channels, kernel, frames, batch, geometry, bias):
    """Every shape the kernel takes (strided, dilated, even kernels, any padding), sequences shorter than the
    kernel included, full-range u8 input (the kernel is exact in int32 for any u8), either memory layout, 1
    and 2 threads: the engine's output to the step, but for rounding ties (fp32 requantization in a different
    order)."""
    with engine_scope(ENGINE):
        conv = _engine_conv(channels, kernel, bias, seed=channels + kernel, **geometry)
        ours = depthwise.DepthwiseConv1d.of(conv)
        g = torch.Generator().manual_seed(frames)
        ints = torch.randint(0, 256, (batch, channels, frames), generator=g, dtype=torch.uint8)
        x = torch._make_per_tensor_quantized_tensor(ints, 0.05, 133)
        want = conv(x).int_repr().int()
        threads = torch.get_num_threads()
        try:
            for n in (1, 2):
                torch.set_num_threads(n)
                for layout in (x, x.transpose(1, 2).contiguous().transpose(1, 2)):
                    got = ours(layout)
                    assert got.shape == want.shape and got.q_scale() == conv.scale
                    assert got.q_zero_point() == conv.zero_point
                    diff = (got.int_repr().int() - want).abs()
                    assert int(diff.max()) <= 1 and int(diff.gt(0).sum()) <= max(2, diff.numel() // 10_000)
        finally:
            torch.set_num_threads(threads)


@needs_kernel
def test_it_saves_copies_and_reloads_as_the_engines_conv():
    """Same state dict as nnq.Conv1d (artifacts, `rebuild` and the gate's fp32 units rely on it); a deep
    copy and a module loaded from the state dict compute the same."""
    with engine_scope(ENGINE):
        conv = _engine_conv(32, 9, True, seed=3)
        ours = depthwise.DepthwiseConv1d.of(conv)
        mine, theirs = ours.state_dict(), conv.state_dict()
        assert mine.keys() == theirs.keys()
        x = torch.quantize_per_tensor(torch.randn(2, 32, 50), 0.05, 60, torch.quint8)
        again = depthwise.DepthwiseConv1d(32, 32, 9, padding=4, groups=32)
        again.load_state_dict(theirs)
        for other in (copy.deepcopy(ours), again):
            assert torch.equal(other(x).int_repr(), ours(x).int_repr())


def test_only_depthwise_convs_of_whole_8_channel_blocks_are_swapped():
    """Any kernel, stride, dilation and padding; convs with channels not a multiple of 8, non-zero padding
    modes, and dense or grouped ones stay the engine's."""
    with engine_scope(ENGINE):
        yes = [
            nnq.Conv1d(16, 16, 5, padding=2, groups=16),
            nnq.Conv1d(16, 16, 5, padding=2, groups=16, stride=2),
            nnq.Conv1d(16, 16, 5, padding=4, groups=16, dilation=2),
            nnq.Conv1d(16, 16, 4, padding=2, groups=16),
        ]
        no = [
            nnq.Conv1d(12, 12, 5, padding=2, groups=12),
            nnq.Conv1d(16, 16, 5, padding=2, groups=16, padding_mode="reflect"),
            nnq.Conv1d(16, 16, 5, padding=2),
            nnq.Conv1d(16, 16, 5, padding=2, groups=2),
        ]
    assert all(depthwise.swappable(m) for m in yes) and not any(depthwise.swappable(m) for m in no)


def test_bad_input_is_named():
    if not X86_AVX2:
        pytest.skip("the kernel is for x86 CPUs with AVX2 and FMA")
    with engine_scope(ENGINE):
        ours = depthwise.DepthwiseConv1d.of(_engine_conv(8, 3, True, seed=1))
        with pytest.raises(ValueError, match="quint8"):
            ours(torch.randn(1, 8, 10))
