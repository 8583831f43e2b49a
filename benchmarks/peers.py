"""The peers' models, built from the lean model's encoder + decoder: ONNX Runtime and OpenVINO (NNCF).

`onnx_sessions`: the ONNX export (features [B, F, T] -> logits [B, C, T']) and ONNX Runtime fp32 and
int8 (static QDQ, per-channel) sessions of it, used by vs_peers.py and cpu_kinds.py;
`openvino_models`: OpenVINO fp32 and NNCF post-training int8 of that export (cpu_kinds.py), and
`openvino_kernels`: which kernels OpenVINO compiled them to;
`exportable_conformer`: what a Conformer needs during the export. Needs the `bench` extra.
"""

from __future__ import annotations

import statistics
from contextlib import contextmanager
from pathlib import Path

import torch


class EncoderLogits(torch.nn.Module):
    """features [B, F, T] (no padding) -> decoder logits [B, C, T']: the graph ONNX Runtime runs."""

    def __init__(self, lean):
        super().__init__()
        self.encoder, self.decoder = lean.encoder, lean.decoder

    def forward(self, feats: torch.Tensor) -> torch.Tensor:
        lens = torch.full((feats.shape[0],), feats.shape[2], dtype=torch.long)
        return self.decoder(self.encoder(feats, lens)[0])


def onnx_sessions(lean, calibration: list[torch.Tensor], threads: int, folder: Path) -> dict:
    """ONNX Runtime fp32 and int8 (static QDQ, per-channel, calibrated on real features) sessions."""
    import onnxruntime as ort
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    fp32, pre, int8 = folder / "enc_fp32.onnx", folder / "enc_pre.onnx", folder / "enc_int8.onnx"
    example = calibration[0].unsqueeze(0)
    torch.onnx.export(
        EncoderLogits(lean).eval(),
        (example,),
        str(fp32),
        input_names=["feats"],
        output_names=["logits"],
        dynamic_axes={"feats": {0: "batch", 2: "time"}},
        dynamo=False,
    )
    quant_pre_process(str(fp32), str(pre))

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.feeds = iter([{"feats": f.unsqueeze(0).numpy()} for f in calibration])

        def get_next(self):
            return next(self.feeds, None)

    quantize_static(str(pre), str(int8), Reader(), quant_format=QuantFormat.QDQ, per_channel=True)
    options = ort.SessionOptions()
    options.intra_op_num_threads, options.inter_op_num_threads = threads, 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    return {
        name: ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        for name, path in (("ort_fp32", fp32), ("ort_int8", int8))
    }


@contextmanager
def exportable_conformer():
    """During the ONNX export only, three lean Conformer pieces in NeMo's own form (the same values): the
    `as_strided` `rel_shift` (which the TorchScript exporter cannot give a dynamic time axis) as NeMo's
    pad-view-slice; the conv module's channels-last [B, C, 1, T] depthwise conv2d trick as NeMo's
    transpose + Conv1d (NNCF int8 of the trick's graph fails in OpenVINO for any other length), and the
    attention's one-copy cast (`_packed`: empty + copy_, which the exporter has no ONNX op for) as a cast."""
    from runner.model import conformer

    def pad_view_slice(bd: torch.Tensor) -> torch.Tensor:
        x, y, t, n = bd.shape
        return torch.nn.functional.pad(bd, (1, 0)).view(x, y, -1, t)[:, :, 1:].reshape(x, y, t, n)[..., :t]

    def conv_module(self, x: torch.Tensor, pad_mask) -> torch.Tensor:
        x = torch.nn.functional.glu(self.pointwise_conv1(x), dim=-1)
        if pad_mask is not None:
            x = x.masked_fill(pad_mask, 0.0)
        y = self.batch_norm(self.depthwise_conv(x.transpose(1, 2)))
        return self.pointwise_conv2(self.activation(y).transpose(1, 2))

    def packed(x: torch.Tensor, dtype: torch.dtype, *shape: int) -> torch.Tensor:
        return x.to(dtype).contiguous().view(*shape)

    saved = conformer.rel_shift, conformer.ConformerConvolution.forward, conformer._packed
    conformer.rel_shift, conformer.ConformerConvolution.forward, conformer._packed = pad_view_slice, conv_module, packed
    try:
        yield
    finally:
        conformer.rel_shift, conformer.ConformerConvolution.forward, conformer._packed = saved


def equal_windows(feats: list[torch.Tensor]) -> list[torch.Tensor]:
    """The same features, concatenated and cut into windows of their median length: NNCF's Transformer
    preset stacks some per-sample statistics, which needs one shape for every sample."""
    whole, n = torch.cat(feats, dim=1), int(statistics.median(f.shape[1] for f in feats))
    return [whole[:, i : i + n] for i in range(0, whole.shape[1] - n + 1, n)]


def openvino_models(
    onnx_fp32: Path, calibration: list[torch.Tensor], threads: int, transformer: bool, int8_float: str | None = None
) -> dict:
    """OpenVINO fp32 and NNCF post-training int8 compiled models of the ONNX fp32 export. `int8_float`: the
    precision of what stays float in the int8 model (None: OpenVINO's default, bf16 where the CPU has it)."""
    import nncf
    import openvino as ov

    core = ov.Core()
    model = core.read_model(str(onnx_fp32))
    config = {"INFERENCE_NUM_THREADS": threads, "PERFORMANCE_HINT": "LATENCY", "NUM_STREAMS": 1}
    fp32 = core.compile_model(model, "CPU", {**config, "INFERENCE_PRECISION_HINT": "f32"})
    windows = [f.unsqueeze(0).numpy() for f in equal_windows(calibration)]
    options = {}
    if transformer:  # NNCF's preset for attention models; per-tensor activations: NNCF puts the per-channel
        # quantizer of a depthwise conv's input before the transpose to [B, C, T], on the time axis,
        # and OpenVINO then refuses any other length (nncf 3.4.0)
        from nncf.quantization.advanced_parameters import AdvancedQuantizationParameters, QuantizationParameters

        options = {
            "model_type": nncf.ModelType.TRANSFORMER,
            "advanced_parameters": AdvancedQuantizationParameters(
                activations_quantization_params=QuantizationParameters(per_channel=False)
            ),
        }
    qmodel = nncf.quantize(model, nncf.Dataset(windows), subset_size=len(windows), **options)
    hint = {"INFERENCE_PRECISION_HINT": int8_float} if int8_float else {}  # default: its best
    int8 = core.compile_model(qmodel, "CPU", {**config, **hint})
    return {"ov_fp32": fp32, "ov_int8": int8}


def openvino_kernels(compiled) -> dict[str, int]:
    """How many of a compiled model's compute nodes run each kernel, "Layer: primitive" -> count, as its
    runtime graph reports them (e.g. "Convolution: jit_avx2_1x1_I8"): which ISA it dispatched to."""
    kinds: dict[str, int] = {}
    for op in compiled.get_runtime_model().get_ops():
        info = op.get_rt_info()
        layer, kernel = (info[k].astype(str) if k in info else "?" for k in ("layerType", "primitiveType"))
        if layer not in ("Const", "Input", "Output", "Reshape"):
            kinds[f"{layer}: {kernel}"] = kinds.get(f"{layer}: {kernel}", 0) + 1
    return dict(sorted(kinds.items()))
