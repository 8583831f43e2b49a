"""Long files: windowed encoding matches whole-file transcripts, with bounded memory."""

import json
import subprocess
import sys

import pytest

from runner.inputs.audio import load_audio
from runner.metrics import cer, wer, word_timing_figures
from runner.model.ctc import save_checkpoint
from runner.model.nemo_loader import describe
from runner.model.transcribe import DecodeOptions, transcribe, word_aligner

pytestmark = pytest.mark.slow


def test_chunked_transcript_matches_whole_file(tiny_lean, long_speech):
    """Windows of 30 s (5 s of context each side) give the whole file's transcript, and its words at
    the same times: continuous through the file, none lost or repeated at a window border."""
    path, reference = long_speech
    audio = load_audio(path, 16000)
    assert len(audio) >= 600 * 16000
    aligner = word_aligner(tiny_lean)
    whole = transcribe(tiny_lean, [audio], DecodeOptions(window_seconds=1e9), aligner=aligner)[0]
    chunked = transcribe(tiny_lean, [audio], DecodeOptions(window_seconds=30, context_seconds=5), aligner=aligner)[0]
    print("whole-file CER", cer([reference], [whole.text]), "chunked vs whole WER", wer([whole.text], [chunked.text]))
    # The tiny model was trained on short utterances only, yet it really transcribes here.
    assert cer([reference], [whole.text]) < 0.5
    assert wer([whole.text], [chunked.text]) <= 0.01, wer([whole.text], [chunked.text])
    assert [w["word"] for w in chunked.words] == chunked.text.split()
    assert chunked.words[-1]["end"] <= len(audio) / 16000 and chunked.words[-1]["start"] > 590
    starts = [w["start"] for w in chunked.words]
    assert starts == sorted(starts)
    figures = word_timing_figures([(whole.words, chunked.words)], aligner.frame_seconds)
    assert figures["matched_words"] >= 0.99 * len(whole.words), figures
    assert figures["within_one_frame"] >= 0.99, figures
    # Every window border (30 s apart): the words around it are the whole file's, once each.
    for border in range(30, int(len(audio) / 16000), 30):
        near = [w["word"] for w in whole.words if abs(w["start"] - border) < 3]
        assert [w["word"] for w in chunked.words if abs(w["start"] - border) < 3] == near, border


RSS_SCRIPT = r"""
import json, sys, time
from runner.sysinfo import peak_rss_mb
t0 = time.perf_counter()
from runner.inputs.audio import load_audio
from runner.model.ctc import load_model
from runner.model.transcribe import transcribe_batch
import torch
torch.set_num_threads(2)
model = load_model(sys.argv[1])
audio = load_audio(sys.argv[2], 16000)
text = transcribe_batch(model, [audio])[0]
print(json.dumps({"peak_rss_mb": peak_rss_mb(),
                  "seconds": time.perf_counter() - t0, "audio_seconds": len(audio) / 16000,
                  "nemo_imported": any(m.split(".")[0] == "nemo" for m in sys.modules), "words": len(text.split())}))
"""


def test_ten_minute_file_with_quartznet15x5_stays_under_1_5_gb(quartznet15x5_nemo, long_speech, tmp_path):
    ckpt = tmp_path / "qn15x5.pt"
    save_checkpoint(*describe(quartznet15x5_nemo), ckpt)
    out = subprocess.run(
        [sys.executable, "-c", RSS_SCRIPT, str(ckpt), long_speech[0]],
        capture_output=True,
        text=True,
        check=True,
        timeout=600,
    )
    figures = json.loads(out.stdout.strip().splitlines()[-1])
    print(figures)
    assert figures["audio_seconds"] >= 600
    assert not figures["nemo_imported"]
    assert figures["peak_rss_mb"] < 1536, figures
