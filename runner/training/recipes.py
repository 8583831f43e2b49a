"""NeMo model recipes: QuartzNet and Citrinet configs, SentencePiece tokenizers, a small CPU training loop
(driver side only).

The configs are plain dicts (no NeMo import); `build_nemo_model` and `train_ctc` import NeMo
when called. Used to make the models the tests and benchmarks run, and the demo model.
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Callable, Sequence

import numpy as np
import torch

log = logging.getLogger(__name__)

CHAR_LABELS = tuple(" abcdefghijklmnopqrstuvwxyz'")


def _block(filters, repeat, kernel, stride=1, dilation=1, residual=False, separable=True, dropout=0.0):
    return dict(
        filters=filters,
        repeat=repeat,
        kernel=[kernel],
        stride=[stride],
        dilation=[dilation],
        dropout=dropout,
        residual=residual,
        separable=separable,
    )


def _preprocessor(sample_rate: int = 16000, features: int = 64, window_size: float = 0.02, **extra) -> dict:
    return dict(
        _target_="nemo.collections.asr.modules.AudioToMelSpectrogramPreprocessor",
        normalize="per_feature",
        window_size=window_size,
        window_stride=0.01,
        sample_rate=sample_rate,
        window="hann",
        features=features,
        n_fft=512,
        frame_splicing=1,
        dither=1e-5,
        **extra,
    )


def ctc_config(blocks: list[dict], labels: Sequence[str] = CHAR_LABELS, activation: str = "relu") -> dict:
    """An `EncDecCTCModel` config (QuartzNet/Jasper family) around the given encoder blocks."""
    labels = list(labels)
    return dict(
        sample_rate=16000,
        labels=labels,
        preprocessor=_preprocessor(),
        encoder=dict(
            _target_="nemo.collections.asr.modules.ConvASREncoder",
            feat_in=64,
            activation=activation,
            conv_mask=True,
            jasper=blocks,
        ),
        decoder=dict(
            _target_="nemo.collections.asr.modules.ConvASRDecoder",
            feat_in=blocks[-1]["filters"],
            num_classes=len(labels),
            vocabulary=labels,
        ),
    )


def quartznet15x5_config(dropout: float = 0.0) -> dict:
    """NeMo's QuartzNet15x5 (18.9 M parameters), as in examples/asr/conf/quartznet/quartznet_15x5.yaml."""
    blocks = [_block(256, 1, 33, stride=2, dropout=dropout)]
    for filters, kernel in ((256, 33), (256, 39), (512, 51), (512, 63), (512, 75)):
        blocks += [_block(filters, 5, kernel, residual=True, dropout=dropout) for _ in range(3)]
    blocks += [_block(512, 1, 87, dilation=2, dropout=dropout), _block(1024, 1, 1, separable=False, dropout=dropout)]
    return ctc_config(blocks)


def tiny_quartznet_config() -> dict:
    """A 0.17 M-parameter QuartzNet that learns a small espeak-ng grammar in about a minute on 2 cores."""
    return ctc_config(
        [
            _block(128, 1, 11, stride=2),
            _block(128, 2, 13, residual=True),
            _block(128, 2, 17, residual=True),
            _block(128, 1, 21, dilation=2),
            _block(192, 1, 1, separable=False),
        ]
    )


# Citrinet (NeMo examples/asr/conf/citrinet/citrinet_384.yaml; "Citrinet-C" = every `filters` set to C):
# a prologue, three mega-blocks that each start with a 2x stride_last/stride_add block, an epilogue.
CITRINET_KERNELS = ((11, 13, 15, 17, 19, 21), (13, 15, 17, 19, 21, 23, 25), (25, 27, 29, 31, 33, 35, 37, 39))


def _se_block(filters, repeat, kernel, stride=1, residual=True, se_reduction_ratio=8, kernel_size_factor=1.0):
    block = dict(
        filters=filters,
        repeat=repeat,
        kernel=[kernel],
        stride=[stride],
        dilation=[1],
        dropout=0.0,
        residual=residual,
        separable=True,
        se=True,
        se_context_size=-1,
        se_reduction_ratio=se_reduction_ratio,
        kernel_size_factor=kernel_size_factor,
    )
    if stride > 1:
        block.update(stride_last=True, residual_mode="stride_add")
    return block


def citrinet_config(
    tokenizer_dir: str,
    filters: int,
    enc_final: int,
    repeat: int = 5,
    kernels: Sequence[Sequence[int]] = CITRINET_KERNELS,
    kernel_size_factor: float = 1.0,
    features: int = 80,
) -> dict:
    """An `EncDecCTCModelBPE` Citrinet config around a SentencePiece tokenizer folder (`train_tokenizer`)."""
    ksf = kernel_size_factor
    blocks = [_se_block(filters, 1, 5, residual=False)]
    for mega in kernels:
        blocks.append(_se_block(filters, repeat, mega[0], stride=2, kernel_size_factor=ksf))
        blocks += [_se_block(filters, repeat, k, kernel_size_factor=ksf) for k in mega[1:]]
    blocks.append(_se_block(enc_final, 1, 41, residual=False, kernel_size_factor=ksf))
    return dict(
        sample_rate=16000,
        tokenizer=dict(dir=str(tokenizer_dir), type="bpe"),
        validation_ds=dict(
            manifest_filepath=None, sample_rate=16000, batch_size=8, shuffle=False, use_start_end_token=False
        ),  # as in NeMo's configs; transcribe() reads it
        preprocessor=_preprocessor(features=features, window_size=0.025, pad_to=16),
        encoder=dict(
            _target_="nemo.collections.asr.modules.ConvASREncoder",
            feat_in=features,
            activation="relu",
            conv_mask=True,
            jasper=blocks,
        ),
        decoder=dict(
            _target_="nemo.collections.asr.modules.ConvASRDecoder", feat_in=enc_final, num_classes=-1, vocabulary=[]
        ),
    )


def citrinet_256_config(tokenizer_dir: str) -> dict:
    """NeMo's Citrinet-256 (stt_en_citrinet_256's layout: 23 blocks, 8x stride, 640 final channels)."""
    return citrinet_config(tokenizer_dir, filters=256, enc_final=640)


def small_citrinet_config(tokenizer_dir: str) -> dict:
    """A ~0.2 M-parameter Citrinet (SE, stride_last/stride_add, 8x stride) that learns the espeak-ng
    grammar of `runner.training.corpus.sentences` in about a minute on 2 cores."""
    return citrinet_config(
        tokenizer_dir, filters=96, enc_final=128, repeat=1, kernels=((11, 13), (13, 15), (15, 17)), features=64
    )


def train_tokenizer(texts: Sequence[str], folder, vocab_size: int = 128, kind: str = "bpe") -> str:
    """A SentencePiece tokenizer trained on `texts` with NeMo's own recipe (`create_spt_model`, as in its
    process_asr_text_tokenizer.py): tokenizer.model, tokenizer.vocab and vocab.txt in `folder`."""
    from pathlib import Path

    from nemo.collections.common.tokenizers.sentencepiece_tokenizer import create_spt_model

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    corpus = folder / "text_corpus.txt"
    corpus.write_text("".join(t + "\n" for t in texts))
    create_spt_model(
        str(corpus), vocab_size, sample_size=-1, do_lower_case=False, tokenizer_type=kind, output_dir=str(folder)
    )
    return str(folder)


def conformer_ctc_config(
    d_model: int,
    n_layers: int,
    n_heads: int,
    subsampling: str = "dw_striding",
    factor: int = 8,
    conv_channels: int = -1,
    kernel: int = 9,
    features: int = 80,
    labels: Sequence[str] = CHAR_LABELS,
    dropout: float = 0.0,
) -> dict:
    """An `EncDecCTCModel` config with NeMo's ConformerEncoder: `striding` subsampling is Conformer-CTC,
    `dw_striding` (factor 8, 256 conv channels, kernel 9) FastConformer-CTC, as in NeMo's example configs."""
    labels = list(labels)
    return dict(
        sample_rate=16000,
        labels=labels,
        preprocessor=_preprocessor(features=features, window_size=0.025),
        encoder=dict(
            _target_="nemo.collections.asr.modules.ConformerEncoder",
            feat_in=features,
            feat_out=-1,
            n_layers=n_layers,
            d_model=d_model,
            subsampling=subsampling,
            subsampling_factor=factor,
            subsampling_conv_channels=conv_channels,
            causal_downsampling=False,
            ff_expansion_factor=4,
            self_attention_model="rel_pos",
            n_heads=n_heads,
            att_context_size=[-1, -1],
            att_context_style="regular",
            xscaling=True,
            untie_biases=True,
            pos_emb_max_len=5000,
            conv_kernel_size=kernel,
            conv_norm_type="batch_norm",
            conv_context_size=None,
            dropout=dropout,
            dropout_pre_encoder=dropout,
            dropout_emb=0.0,
            dropout_att=dropout,
        ),
        decoder=dict(
            _target_="nemo.collections.asr.modules.ConvASRDecoder",
            feat_in=d_model,
            num_classes=len(labels),
            vocabulary=labels,
        ),
    )


def fastconformer_ctc_config(size: str = "large") -> dict:
    """NeMo's FastConformer-CTC sizes (examples/asr/conf/fastconformer/fast-conformer_ctc_bpe.yaml):
    medium 256/4 heads/16 layers (~32 M with BPE), large 512/8/17 (~115 M); character vocabulary here."""
    d_model, n_heads, n_layers = {"small": (176, 4, 16), "medium": (256, 4, 16), "large": (512, 8, 17)}[size]
    return conformer_ctc_config(d_model, n_layers, n_heads, "dw_striding", 8, conv_channels=256, kernel=9)


def tiny_fastconformer_config() -> dict:
    """A 0.24 M-parameter FastConformer-CTC (dw_striding, factor 4: characters need 40 ms frames)
    that learns the espeak-ng test grammar in 300 steps (80 s on 2 idle cores; CER ~5%)."""
    return conformer_ctc_config(64, 2, 4, "dw_striding", 4, conv_channels=32, kernel=15, features=64)


def build_nemo_model(config: dict):
    """An untrained NeMo CTC model (eval mode) from a config dict: `EncDecCTCModelBPE` when it names a tokenizer."""
    from nemo.collections.asr.models import EncDecCTCModel, EncDecCTCModelBPE
    from omegaconf import OmegaConf

    cls = EncDecCTCModelBPE if "tokenizer" in config else EncDecCTCModel
    return cls(cfg=OmegaConf.create(config)).eval()


def randomize_batchnorm(model: torch.nn.Module, seed: int = 0) -> None:
    """Non-trivial BN statistics and affine weights for an untrained model, so that benchmarks and
    parity tests see realistic activation ranges (and a wrong BN order or eps shows in the outputs)."""
    gen = torch.Generator().manual_seed(seed)
    for mod in model.modules():
        if isinstance(mod, torch.nn.BatchNorm1d):
            n = mod.num_features
            mod.running_mean.copy_(torch.randn(n, generator=gen) * 0.3)
            mod.running_var.copy_(torch.rand(n, generator=gen) + 0.5)
            mod.weight.data.copy_(torch.rand(n, generator=gen) + 0.5)
            mod.bias.data.copy_(torch.randn(n, generator=gen) * 0.1)


def train_ctc(
    model,
    data: Sequence[tuple[str, np.ndarray]],
    steps: int,
    batch_size: int = 16,
    lr: float = 3e-3,
    seed: int = 0,
    log_every: int = 50,
    time_limit: float | None = None,
):
    """Train a NeMo CTC model in place on (text, 16 kHz audio) pairs with AdamW; returns it in eval mode.
    Targets are characters, or the model's tokenizer ids for subword (BPE) models."""
    torch.manual_seed(seed)
    rng = random.Random(seed)
    index = target_ids(model)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-3)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.15)
    model.train()
    start = time.monotonic()
    for step in range(1, steps + 1):
        loss = _train_step(model, rng.sample(list(data), min(batch_size, len(data))), index)
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 5.0)
        opt.step()
        sched.step()
        if step % log_every == 0:
            log.info("step %d loss %.3f (%.0f s)", step, loss.item(), time.monotonic() - start)
        if time_limit and time.monotonic() - start > time_limit:
            break
    return model.eval()


def target_ids(model) -> Callable[[str], list[int]]:
    """text -> CTC target ids: the tokenizer's for subword models, else one per character."""
    if getattr(model, "tokenizer", None) is not None:
        return model.tokenizer.text_to_ids
    index = {c: i for i, c in enumerate(model.decoder.vocabulary)}
    return lambda text: [index[c] for c in text]


def _train_step(model, batch, index: Callable[[str], list[int]]) -> torch.Tensor:
    lengths = torch.tensor([len(a) for _, a in batch])
    audio = torch.zeros(len(batch), int(lengths.max()))
    for i, (_, a) in enumerate(batch):
        audio[i, : len(a)] = torch.from_numpy(a)
    targets = [torch.tensor(index(text)) for text, _ in batch]
    target_lengths = torch.tensor([len(t) for t in targets])
    padded = torch.nn.utils.rnn.pad_sequence(targets, batch_first=True)
    log_probs, enc_lengths, _ = model(input_signal=audio, input_signal_length=lengths)
    return model.loss(log_probs=log_probs, targets=padded, input_lengths=enc_lengths, target_lengths=target_lengths)
