"""Activation observers for int8 calibration: the candidates, one pass for all of them, a faster histogram.

`qconfig(observer)` is what the family modules (`conv_family`, `conformer_family`) attach:
per-channel symmetric int8 weights and one of `OBSERVERS` for uint8 activations, or `"all"`:
`EveryObserver` feeds each calibration tensor to every candidate, and `use_observer` picks the
one `convert` reads (`runner.int8.pipeline` measures each on the accuracy gate).
"""

from __future__ import annotations

import warnings
from contextlib import contextmanager

import numpy as np
import torch
from torch import nn
from torch.ao.quantization.observer import HistogramObserver, ObserverBase

OBSERVERS = ("histogram", "minmax", "moving_average")


@contextmanager
def quiet():
    """torch.ao.quantization warns that it is deprecated (in favour of torchao); keep it out of user output."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


def _histc(x: torch.Tensor, bins: int, lo: torch.Tensor, hi: torch.Tensor) -> torch.Tensor:
    """`torch.histc(x, bins, lo, hi)` for float32 `x` within [lo, hi]: the same bin of each element (the same
    float32 arithmetic, (x - lo) / (hi - lo) * bins, truncated; x == hi in the last bin), counted with
    `bincount`, which is 3x faster than histc's loop on one core."""
    if lo == hi:
        return torch.histc(x, bins, min=lo, max=hi)  # histc widens an empty range: its own rule
    x = _memory_order(x)  # channels-last activations: flatten would copy them; counts do not depend on order
    idx = ((x - lo) / (hi - lo) * bins).to(torch.int64).clamp_(0, bins - 1)
    return torch.bincount(idx.flatten(), minlength=bins).to(torch.float32)


def _memory_order(x: torch.Tensor) -> torch.Tensor:
    """`x` with its dimensions permuted so that it is contiguous, when some order makes it so."""
    if x.is_contiguous():
        return x
    order = sorted(range(x.dim()), key=lambda d: -x.stride(d))
    view = x.permute(order)
    return view if view.is_contiguous() else x


class FastHistogramObserver(HistogramObserver):
    """torch's HistogramObserver, the same histogram and the same range found, faster where it spends its time.

    - `forward` counts with `_histc` (torch.histc took more time than the convolutions it observes).
    - `_non_linear_param_search` walks the cumulative histogram with array searches: torch's indexes one
      tensor element at a time in Python, up to 10^5 steps per activation (seconds per QuartzNet15x5
      conversion). Same steps, same float32 comparisons, same error function.
    Tests compare both with torch's on real activations: bit for bit."""

    def forward(self, x_orig: torch.Tensor) -> torch.Tensor:
        if x_orig.numel() == 0 or x_orig.dtype != torch.float32:
            return super().forward(x_orig)
        x = x_orig.detach()
        x_min, x_max = torch.aminmax(x)
        if not bool(torch.isfinite(x_min) & torch.isfinite(x_max)):
            return super().forward(x_orig)  # infinities or NaN: torch's own handling
        if self.min_val == float("inf") or self.max_val == float("-inf"):  # the first tensor
            for buf, value in ((self.min_val, x_min), (self.max_val, x_max)):
                buf.resize_(value.shape)
                buf.copy_(value)
            histogram = _histc(x, self.bins, x_min, x_max)
        else:
            current_min, current_max = self.min_val, self.max_val
            new_min, new_max = torch.min(current_min, x_min).detach(), torch.max(current_max, x_max).detach()
            update = _histc(x, self.bins, new_min, new_max)
            if new_min == current_min and new_max == current_max:
                histogram = self.histogram + update
            else:
                histogram = self._combine_histograms(self.histogram, current_min, current_max, update, new_min, new_max)
                for buf, value in ((self.min_val, new_min), (self.max_val, new_max)):
                    buf.detach_().resize_(value.shape)
                    buf.copy_(value)
        self.histogram.detach_().resize_(histogram.shape)
        self.histogram.copy_(histogram)
        return x_orig

    def _non_linear_param_search(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self.histogram.size()[0] != self.bins:
            raise AssertionError("bins mismatch")
        csum = torch.cumsum(self.histogram, dim=0).numpy()
        if csum.dtype != np.float32 or not bool(np.all(csum[1:] >= csum[:-1])):
            return super()._non_linear_param_search()  # the searches below need a sorted float32 array
        bin_width = (self.max_val - self.min_val) / self.bins
        total = torch.sum(self.histogram).item()
        stepsize = 1e-5
        alpha, beta = 0.0, 1.0
        start_bin, end_bin = 0, self.bins - 1
        norm_min = float("inf")
        while alpha < beta:
            next_alpha, next_beta = alpha + stepsize, beta - stepsize
            # torch's walks: the first bin from start_bin with csum >= next_alpha * total (else end_bin), and
            # the last bin down from end_bin with csum <= next_beta * total (else start_bin), in float32
            left = min(max(int(np.searchsorted(csum, np.float32(next_alpha * total), side="left")), start_bin), end_bin)
            right = min(
                max(int(np.searchsorted(csum, np.float32(next_beta * total), side="right")) - 1, start_bin), end_bin
            )
            next_start_bin, next_end_bin = start_bin, end_bin
            if (left - start_bin) > (end_bin - right):
                next_start_bin, alpha = left, next_alpha
            else:
                next_end_bin, beta = right, next_beta
            if next_start_bin == start_bin and next_end_bin == end_bin:
                continue
            norm = self._compute_quantization_error(next_start_bin, next_end_bin)
            if norm > norm_min:
                break
            norm_min, start_bin, end_bin = norm, next_start_bin, next_end_bin
        return self.min_val + bin_width * start_bin, self.min_val + bin_width * (end_bin + 1)


def _activation_observers() -> dict:
    from torch.ao.quantization import MinMaxObserver, MovingAverageMinMaxObserver

    return {
        "histogram": FastHistogramObserver.with_args(reduce_range=False),
        "minmax": MinMaxObserver.with_args(reduce_range=False),
        "moving_average": MovingAverageMinMaxObserver.with_args(averaging_constant=0.01, reduce_range=False),
    }


def qconfig(observer: str = "histogram"):
    """Per-channel symmetric int8 weights (every engine's choice) and full-range uint8 activations.

    Full range (no `reduce_range`) is what the artifact records; a CPU whose kernels would
    saturate on it derives 7-bit activations from the same ranges (`with_activation_bits`).
    `observer="all"`: every candidate observes in one pass (`EveryObserver`); `use_observer` picks
    the one `convert` reads.
    """
    from torch.ao.quantization import QConfig, default_per_channel_weight_observer

    if observer == "all":
        return QConfig(activation=EveryObserver, weight=default_per_channel_weight_observer)
    activations = _activation_observers()
    if observer not in activations:
        raise ValueError(f"observer must be one of all, {', '.join(OBSERVERS)}, got {observer!r}")
    return QConfig(activation=activations[observer], weight=default_per_channel_weight_observer)


class EveryObserver(ObserverBase):
    """Each candidate activation observer (`OBSERVERS`) sees every calibration tensor, so one pass over the
    calibration audio calibrates them all; `calculate_qparams` answers for the one `use` names (set by
    `use_observer`). Each candidate's ranges are exactly what it reaches observing alone: the same tensors in
    the same order."""

    def __init__(self, dtype=torch.quint8, **kwargs):
        super().__init__(dtype=dtype, **kwargs)
        factories = _activation_observers()
        self.candidates = nn.ModuleDict({name: factories[name]() for name in OBSERVERS})
        self.use = OBSERVERS[0]
        first = self.candidates[self.use]  # all candidates share dtype, qscheme and range
        self.qscheme, self.quant_min, self.quant_max = first.qscheme, first.quant_min, first.quant_max

    def forward(self, x):
        # Channels-last activations (the conv family's) are seen as the contiguous tensor they are in memory:
        # the observers' reductions (aminmax, the histogram) do not depend on order, and aminmax ran 14x
        # slower on the strided view ([8, 512, 300]: 1.47 ms vs 0.10 ms).
        seen = _memory_order(x)
        for observer in self.candidates.values():
            observer(seen)
        return x

    @torch.jit.export
    def calculate_qparams(self):
        return self.candidates[self.use].calculate_qparams()


def use_observer(observed: nn.Module, name: str) -> None:
    """Make every `EveryObserver` of an observed model answer with the `name` candidate's ranges."""
    if name not in OBSERVERS:
        raise ValueError(f"observer must be one of {', '.join(OBSERVERS)}, got {name!r}")
    for module in observed.modules():
        if isinstance(module, EveryObserver):
            module.use = name
