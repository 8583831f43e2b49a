"""What an int8 artifact is made from (issue 16): the cache key covers the audio the samples read and the
quantization code; a cached artifact is used only when its own record matches; long files take part in
calibration and the gate as windows; a FIFO in a sample is skipped without being opened."""

import logging
import os
import shutil
import threading
from pathlib import Path

import soundfile as sf

from runner.inputs.manifest import iter_manifest
from runner.int8.artifact import Artifact
from runner.int8.config import Settings
from runner.int8.make import make_artifact
from runner.int8.samples import draw_samples, read_items

from .support import RATE, pinned_engine, write_manifest

ENGINE = pinned_engine()


def quick(**extra) -> Settings:
    """Small samples, one observer, a tolerance that always passes: seconds per artifact on the tiny model."""
    return Settings(
        **{
            "calibration_items": 2,
            "gate_items": 2,
            "observers": ("minmax",),
            "engine": ENGINE,
            "max_wer_increase": 1.0,
            **extra,
        }
    )


def folder_of(tmp_path: Path, name: str, sources: list[str]) -> str:
    """`name/` with a.wav, b.wav, ... copied from `sources` and the manifest that lists them by relative path."""
    folder = tmp_path / name
    folder.mkdir()
    names = [f"{chr(ord('a') + i)}.wav" for i in range(len(sources))]
    for n, src in zip(names, sources):
        shutil.copyfile(src, folder / n)
    return str(write_manifest(folder / "manifest.jsonl", [{"audio_filepath": n} for n in names]))


def report_of(data: bytes) -> dict:
    return Artifact.from_bytes(data).report


def test_same_manifest_beside_other_audio_is_not_a_cache_hit(tiny_nemo_file, speech_files, tmp_path, monkeypatch):
    monkeypatch.setenv("ASR_RUNNER_CACHE", str(tmp_path / "cache"))
    first = folder_of(tmp_path, "one", [p for _, p in speech_files[:6]])
    second = folder_of(tmp_path, "two", [p for _, p in speech_files[6:12]])
    assert Path(first).read_bytes() == Path(second).read_bytes()  # the same manifest text
    made1 = make_artifact(tiny_nemo_file, first, None, quick())
    made2 = make_artifact(tiny_nemo_file, second, None, quick())
    (data1, cached1), (data2, cached2) = (made1.data, made1.from_cache), (made2.data, made2.from_cache)
    assert not cached1 and not cached2
    assert made2.report == report_of(data2)  # the report handed back is the one inside the bytes
    inputs1, inputs2 = report_of(data1)["inputs"], report_of(data2)["inputs"]
    assert inputs1["cache_key"] != inputs2["cache_key"] and inputs1["model_sha256"] == inputs2["model_sha256"]
    folder2 = str(Path(second).parent)
    assert inputs2["audio"] and all(Path(path).parent == Path(folder2) for path, *_ in inputs2["audio"])
    for path, size, mtime_ns in inputs2["audio"]:  # the record describes the audio the gate ran on
        assert (size, mtime_ns) == (os.stat(path).st_size, os.stat(path).st_mtime_ns)
    assert len(list((tmp_path / "cache").glob("int8-*.pt"))) == 2

    made = make_artifact(tiny_nemo_file, second, None, quick())
    again, hit = made.data, made.from_cache
    assert hit and again == data2
    touched = inputs2["audio"][0][0]
    st = os.stat(touched)
    os.utime(touched, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    made = make_artifact(tiny_nemo_file, second, None, quick())
    data3, hit = made.data, made.from_cache
    assert not hit and report_of(data3)["inputs"]["cache_key"] != inputs2["cache_key"]


def test_code_version_covers_quantization_modules_only(speech_files, tmp_path, monkeypatch):
    from runner.int8 import cache as int8_cache
    from runner.int8.cache import code_version
    from runner.int8.make import cache_key

    base = tmp_path / "base"  # one copy of the sources; the variants are copies of it
    shutil.copytree(int8_cache.SOURCE_DIR, base, ignore=shutil.ignore_patterns("__pycache__", "data"))
    model = tmp_path / "model.nemo"
    model.write_bytes(b"model bytes")
    manifest = str(write_manifest(tmp_path / "m.jsonl", [{"audio_filepath": p} for _, p in speech_files[:4]]))

    def version_and_key(folder: Path) -> tuple[str, str]:
        monkeypatch.setattr(int8_cache, "SOURCE_DIR", folder)
        return code_version(), cache_key(str(model), manifest, None, quick())

    def variant(name: str, edit) -> Path:
        shutil.copytree(base, tmp_path / name)
        edit(tmp_path / name)
        return tmp_path / name

    def append(*names: str):
        def edit(folder: Path) -> None:
            for n in names:
                with open(folder / n, "a") as f:
                    f.write("\n# a change\n")

        return edit

    before = version_and_key(base)
    assert version_and_key(variant("moved", lambda folder: None)) == before  # the sources' bytes, not their place
    for covered in (
        variant("edited", append("int8/model.py")),
        variant("edited_audio", append("inputs/audio.py")),
        variant("edited_model", append("model/conv.py")),
        variant("new_module", lambda folder: (folder / "int8" / "fancy_quant.py").write_text("SCALE = 2\n")),
    ):
        after = version_and_key(covered)
        assert after[0] != before[0] and after[1] != before[1], covered.name
    assert (
        version_and_key(
            variant(
                "orchestration",
                append("job/run.py", "cli/main.py", "job/ray_pool.py", "job/run_folder.py", "int8/cache.py"),
            )
        )
        == before
    )


def test_cached_artifact_made_from_other_inputs_is_not_used(
    tiny_nemo_file, speech_files, tmp_path, monkeypatch, caplog
):
    monkeypatch.setenv("ASR_RUNNER_CACHE", str(tmp_path / "cache"))
    cache = tmp_path / "cache"
    manifest = folder_of(tmp_path, "audio", [p for _, p in speech_files[:6]])
    other = make_artifact(tiny_nemo_file, manifest, None, quick(seed=1)).data
    first = set(cache.glob("int8-*.pt"))
    data = make_artifact(tiny_nemo_file, manifest, None, quick(seed=2)).data
    (path,) = set(cache.glob("int8-*.pt")) - first
    path.write_bytes(other)  # a valid artifact, but made from other samples
    with caplog.at_level(logging.WARNING):
        made = make_artifact(tiny_nemo_file, manifest, None, quick(seed=2))
        again, hit = made.data, made.from_cache
    assert not hit and again != other and "made from other inputs" in caplog.text
    assert report_of(again)["inputs"]["cache_key"] == report_of(data)["inputs"]["cache_key"]
    made = make_artifact(tiny_nemo_file, manifest, None, quick(seed=2))
    assert (made.data, made.from_cache) == (path.read_bytes(), True)  # rewritten
    assert made.report == report_of(made.data)  # from the cache too


def long_manifest(tmp_path: Path, speech_files, long_speech) -> tuple[str, float]:
    """2 short clips + 3 stretches of the long file (two with a duration, the last one to its end)."""
    long_path, reference = long_speech
    rows = [{"audio_filepath": p, "text": t} for t, p in speech_files[:2]]
    rows += [
        {"audio_filepath": long_path, "id": "long-a", "duration": 200.0, "text": reference},
        {"audio_filepath": long_path, "id": "long-b", "offset": 200.0, "duration": 200.0},
        {"audio_filepath": long_path, "id": "long-c", "offset": 400.0},
    ]
    return str(write_manifest(tmp_path / "long.jsonl", rows)), sf.info(long_path).duration


def test_long_files_take_part_as_windows(speech_files, long_speech, tmp_path):
    manifest, total = long_manifest(tmp_path, speech_files, long_speech)
    settings = Settings(calibration_items=20, gate_items=10, max_seconds=15.0)
    entries = {i.id: i for i in iter_manifest(manifest)}
    samples = draw_samples(manifest, None, settings)
    assert (samples.calibration_items, samples.gate_items) == (20, 10)
    assert len(samples.calibration) >= 20 and len(samples.gate) >= 10
    windows = [i for i in samples.calibration + samples.gate if "@" in i.id]
    assert len(windows) >= 25
    for w in windows:
        whole = entries[w.id.split("@")[0]]
        assert w.audio_filepath == whole.audio_filepath and w.text is None
        assert 2.0 <= w.duration <= settings.max_seconds
        end = whole.offset + whole.duration
        assert whole.offset <= w.offset and w.offset + w.duration <= end + 1e-6 and end <= total + 1e-3
        assert w.id == f"{whole.id}@{w.offset:.1f}s"
    for c in samples.calibration:
        for g in samples.gate:
            assert c.audio_filepath != g.audio_filepath or not (
                c.offset < g.offset + g.duration and g.offset < c.offset + c.duration
            ), (c, g)
    for sample, want in ((samples.calibration, 20), (samples.gate, 10)):
        audios, kept, skipped = read_items(sample, RATE, settings.max_seconds, want)
        assert len(audios) == want and skipped == []
        for audio, item in zip(audios, kept):
            assert abs(len(audio) - round(item.duration * RATE)) <= 1


def test_a_gate_with_windows_measures_agreement(tiny_nemo_file, speech_files, long_speech, tmp_path):
    """The manifest's reference belongs to the whole long item: a gate with windows cannot use it."""
    manifest, _ = long_manifest(tmp_path, speech_files, long_speech)
    data = make_artifact(
        tiny_nemo_file, manifest, None, quick(calibration_items=3, gate_items=3, max_seconds=10.0), use_cache=False
    ).data
    report = report_of(data)
    assert any("@" in i for i in report["gate"]["ids"]) and report["gate"]["mode"] == "agreement with fp32"
    assert report["gate"]["utterances"] == 3 and report["calibration"]["utterances"] == 3


def test_a_fifo_in_the_sample_is_skipped_without_opening_it(speech_files, tmp_path):
    fifo = tmp_path / "pipe.wav"
    os.mkfifo(fifo)
    calibration = str(
        write_manifest(
            tmp_path / "cal.jsonl",
            [{"audio_filepath": str(fifo), "duration": 2.0}] + [{"audio_filepath": p} for _, p in speech_files[:2]],
        )
    )
    manifest = str(write_manifest(tmp_path / "m.jsonl", [{"audio_filepath": p} for _, p in speech_files[2:4]]))
    samples = draw_samples(manifest, calibration, quick(calibration_items=3))
    assert str(fifo) in [i.audio_filepath for i in samples.calibration]
    result = {}
    reader = threading.Thread(
        target=lambda: result.update(read=read_items(samples.calibration, RATE, 30.0, 3)), daemon=True
    )
    reader.start()
    reader.join(10)
    try:
        assert not reader.is_alive(), "read_items opened the FIFO and blocks on it"
    finally:
        if reader.is_alive():  # unblock it: a writer opens and closes the FIFO
            os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
    audios, kept, skipped = result["read"]
    assert len(audios) == 2 and str(fifo) not in [i.audio_filepath for i in kept]
    assert len(skipped) == 1 and "not a regular file" in skipped[0]

    from runner.int8.cache import audio_entry

    fifo_item = next(i for i in samples.calibration if i.audio_filepath == str(fifo))
    assert audio_entry(fifo_item)[3:] == ["not a regular file"]
