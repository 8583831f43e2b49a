"""The conv family's int8 depthwise convolutions on x86 CPUs without VNNI: our AVX2 kernel.

On such CPUs oneDNN's int8 depthwise kernel multiplies one tap at a time in 32-bit lanes, no faster than
fp32: QuartzNet15x5's depthwise convs (kernels 33-87) took 33-37% of its int8 time for 9% of its
multiply-adds (AMD EPYC avx2, `benchmarks/conv_profile.py`), while its pointwise convs ran 5.7x faster
per multiply-add. `_depthwise.c` pairs two taps per 32-bit lane (vpmaddwd, exact in int32 for any u8
input): 2.6-3.4x oneDNN's kernel on QuartzNet15x5's shapes, 1.17x / 1.27x on its whole int8 model at
batch 1 / 8 (`benchmarks/depthwise_kernel.py`, oneDNN capped to its AVX2 kernels on a VNNI EPYC); 3.0-4.6x
and 1.46x / 1.43x capped the same way on an Intel Xeon with AMX (`depthwise_builds.py`, `worker_check.py`).
With VNNI or AMX, oneDNN's own kernel (brdgmm) is as fast, and it stays.

`conv_family.cpu_depthwise` swaps the kernel in where it applies (`applies`): x86 with AVX2 and FMA in the flags
int8 decisions read (`sysinfo.int8_flags`, which `ASR_RUNNER_CPU_FLAGS` may replace) and in the CPU's own
flags, no VNNI/AMX flag, an x86 engine (not qnnpack), and the compiled library present (`pip install`
builds it; where it could not, the engine's kernel runs). Depthwise convs with a multiple of 8 channels and
zero padding are swapped, any kernel, stride, dilation and padding: all of QuartzNet's, Jasper's and
Citrinet's, their strided and dilated ones included. The module is an `nnq.Conv1d` (same state dict, same
packed weights for `rebuild`), whose forward calls the kernel. Outputs match oneDNN's to the step but for rare
rounding ties (a few in 10^6 one step off), and every worker's self-check measures the model as it runs.
"""

from __future__ import annotations

import ctypes
import importlib.util
from functools import cache

import torch
import torch.ao.nn.quantized as nnq
from torch import nn

from runner.int8.engines import activation_bits
from runner.sysinfo import cpu_info, int8_flags

NAME = "runner-avx2"  # what reports call this kernel (`depthwise_convs`); else the engine's name
NEEDS = frozenset({"avx2", "fma"})
_P = ctypes.c_void_p
_I = ctypes.c_int


@cache
def library() -> ctypes.CDLL | None:
    """The compiled kernel (`runner/int8/_depthwise.c`, built by `pip install`), or None where it is missing
    or this CPU cannot run it. Loaded after torch (imported above), it binds to torch's OpenMP runtime."""
    spec = importlib.util.find_spec("runner.int8._depthwise")
    if spec is None or not spec.origin:
        return None
    lib = ctypes.CDLL(spec.origin)
    lib.dw_available.restype = _I
    lib.dw_pack.argtypes = [_P, _I, _I, _P]
    lib.dw_pack.restype = None
    lib.dw_forward.argtypes = [_P, _I, _I, _I, _I, _I, _I, _I, _I, _P, _P, _P, _P, _P, _I, _I]
    lib.dw_forward.restype = _I
    return lib if lib.dw_available() else None


def applies(engine: str, cpu_flags=None) -> bool:
    """Whether the conv family's depthwise convs run our AVX2 kernel on this CPU with `engine`: where its
    int8 kernels lack VNNI (`activation_bits` gives 7: x86, an x86 engine, no VNNI/AMX flag), with AVX2 and FMA."""
    flags = set(int8_flags() if cpu_flags is None else cpu_flags)
    return (
        activation_bits(engine, flags) == 7
        and NEEDS <= flags
        and NEEDS <= set(cpu_info()["flags"])  # never on a CPU without AVX2, whatever the override says
        and library() is not None
    )


def kernel_for(engine: str) -> str:
    """What the conv family's depthwise convs run on with `engine` on this CPU, as reports name it."""
    return NAME if applies(engine) else engine


def swappable(module: nn.Module) -> bool:
    """An int8 depthwise conv the kernel computes: channels a multiple of 8, zero padding (any kernel, stride,
    dilation and padding)."""
    if type(module) is not nnq.Conv1d:
        return False
    c = module.in_channels
    return module.groups == c == module.out_channels and c % 8 == 0 and module.padding_mode == "zeros"


class DepthwiseConv1d(nnq.Conv1d):
    """An int8 depthwise `nnq.Conv1d` computed by `_depthwise.c` (its state dict and packed weights are
    nnq.Conv1d's, so it saves, copies and rebuilds like one)."""

    @classmethod
    def of(cls, conv: nnq.Conv1d) -> DepthwiseConv1d:
        new = cls(
            conv.in_channels,
            conv.out_channels,
            conv.kernel_size[0],
            stride=conv.stride[0],
            padding=conv.padding[0],
            dilation=conv.dilation[0],
            groups=conv.groups,
            bias=conv.bias() is not None,
        )
        new.set_weight_bias(conv.weight(), conv.bias())
        new.scale, new.zero_point = conv.scale, conv.zero_point
        return new

    def set_weight_bias(self, w: torch.Tensor, b: torch.Tensor | None) -> None:
        super().set_weight_bias(w, b)  # also called on load_state_dict and deepcopy
        c, k = w.shape[0], w.shape[-1]
        ints = w.int_repr().reshape(c, k).contiguous()
        self._packed = torch.empty(c * ((k + 1) // 2), dtype=torch.int32)
        library().dw_pack(ints.data_ptr(), c, k, self._packed.data_ptr())
        self._weight_sum = ints.sum(1, dtype=torch.int32)
        if w.qscheme() in (torch.per_channel_affine, torch.per_channel_symmetric):
            scales, zero_points = w.q_per_channel_scales(), w.q_per_channel_zero_points()
        else:  # nnq.Conv1d's placeholder before the real weights are set
            scales, zero_points = torch.full((c,), w.q_scale()), torch.full((c,), w.q_zero_point())
        if bool(zero_points.ne(0).any()):
            raise ValueError("DepthwiseConv1d needs symmetric int8 weights (zero points 0)")
        self._weight_scale = scales.double()
        self._bias = torch.zeros(c, dtype=torch.double) if b is None else b.detach().double()
        self._factors: tuple | None = None

    def _requant(self, sx: float, zx: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """fp32 multiplier and offset per channel, and the input zero point's share of each sum."""
        key = (sx, zx, float(self.scale), int(self.zero_point))
        if self._factors is None or self._factors[0] != key:
            sx, zx, sy, zy = key
            mul = (sx * self._weight_scale / sy).float()
            add = (self._bias / sy + zy).float()
            comp = (zx * self._weight_sum).int()
            self._factors = (key, mul, add, comp)
        return self._factors[1:]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 3 or x.dtype != torch.quint8:
            raise ValueError(f"DepthwiseConv1d expects a quint8 [B, C, T] tensor, got {x.dtype} {tuple(x.shape)}")
        n, c, t = x.shape
        if x.stride() != (t * c, 1, c):  # channels last, as oneDNN's convolutions leave their outputs
            x = x.transpose(1, 2).contiguous().transpose(1, 2)
        out = torch._empty_affine_quantized(
            (n, self.frames_out(t), c), scale=float(self.scale), zero_point=int(self.zero_point), dtype=torch.quint8
        )
        self._run(x, t, x.q_scale(), x.q_zero_point(), out)
        return out.transpose(1, 2)

    def rows(self, x: torch.Tensor, scale: float, zero_point: int) -> torch.Tensor:
        """The conv on plain uint8 rows [B, T, C] (contiguous) quantized with `scale` / `zero_point`; returns
        uint8 rows [B, T', C] on this module's output scale and zero point (`runner.int8.direct`)."""
        n, t, c = x.shape
        out = torch.empty((n, self.frames_out(t), c), dtype=torch.uint8)
        self._run(x, t, scale, zero_point, out)
        return out

    def frames_out(self, t: int) -> int:
        """Output frames for `t` input frames, as torch's Conv1d counts them."""
        k, s, d, p = self.kernel_size[0], self.stride[0], self.dilation[0], self.padding[0]
        frames = (t + 2 * p - d * (k - 1) - 1) // s + 1
        if frames < 1:
            raise ValueError(f"DepthwiseConv1d: {t} frames give no output (kernel {k}, dilation {d}, padding {p})")
        return frames

    def _run(self, x: torch.Tensor, t: int, sx: float, zx: int, out: torch.Tensor) -> None:
        """x: [B, t, C] memory, out: [B, T', C] memory (u8 or quint8)."""
        n, frames, c = out.shape
        mul, add, comp = self._requant(sx, zx)
        status = library().dw_forward(
            x.data_ptr(),
            n,
            t,
            c,
            self.kernel_size[0],
            self.stride[0],
            self.dilation[0],
            self.padding[0],
            frames,
            self._packed.data_ptr(),
            mul.data_ptr(),
            add.data_ptr(),
            comp.data_ptr(),
            out.data_ptr(),
            zx,
            torch.get_num_threads(),
        )
        if status != 0:
            raise MemoryError(f"the int8 depthwise kernel could not allocate its scratch for {(n, c, t)}")

    def _get_name(self) -> str:
        return "DepthwiseConv1dAVX2"
