"""`asr-runner convert`: SRT, WebVTT, CTM and NeMo manifests from a run folder, each read back with a real
parser (the `srt` and `webvtt-py` packages, a strict CTM grammar, NeMo's `read_manifest`).

Run folders are built here with `write_part`, a `job.json` and `_SUCCESS`; no model runs.
"""

from __future__ import annotations

import html
import json
import re
from datetime import timedelta
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import srt
import webvtt

from runner.cli.convert import convert
from runner.cli.main import main
from runner.export import CueRules, Word, build_cues, file_ids
from runner.export.subtitles import timestamp
from runner.job.run_folder import write_part

TALK = (
    "good morning everyone and thank you for coming to this short talk about batch transcription "
    "we will look at how long recordings are cut into segments how each segment is transcribed on "
    "ordinary processors and how the words and their times come back together into subtitles that "
    "people can read without effort while the speaker goes on talking about the results"
)
RULES = CueRules()
_MS = timedelta(milliseconds=1)
CTM_LINE = re.compile(r"(?P<id>\S+) 1 (?P<start>\d+\.\d{3}) (?P<dur>\d+\.\d{3}) (?P<word>\S+) (?P<conf>[01]\.\d{4})")


# --- building run folders ---------------------------------------------------------------------------


def spaced_words(text: str, start: float, duration: float) -> list[dict]:
    """The words of `text` spread evenly over [start, start + duration]: each speaks 80% of its slot."""
    tokens = text.split()
    slot = duration / len(tokens)
    return [
        {
            "word": t,
            "start": round(start + k * slot, 3),
            "end": round(start + (k + 0.8) * slot, 3),
            "confidence": round(0.5 + 0.05 * (k % 10), 4),
        }
        for k, t in enumerate(tokens)
    ]


def row(id, path, text, offset=0.0, duration=10.0, words=True, reference="ref", status="ok", error=None) -> dict:
    return {
        "id": id,
        "audio_filepath": str(path),
        "offset": offset,
        "duration": duration,
        "text": text if status == "ok" else "",
        "reference": reference,
        "status": status,
        "error": error,
        "words": spaced_words(text, offset, duration) if words and status == "ok" else None,
        "confidence": 0.9 if words and status == "ok" else None,
    }


def error_row(id, path, reason) -> dict:
    return row(id, path, "", status="error", error=f"{id} ({path}): {reason}")


def make_run(folder: Path, shards: list[list[dict]], finished: bool = True, planned: int | None = None) -> Path:
    folder.mkdir(parents=True)
    plan = [{"shard": i} for i in range(planned or len(shards))]
    (folder / "job.json").write_text(json.dumps({"spec": {"timestamps": True}, "plan": plan}))
    for i, rows in enumerate(shards):
        write_part(folder, i, [{**r, "shard": i} for r in rows])
    if finished:
        (folder / "stats.json").write_text("{}")
        (folder / "_SUCCESS").write_text("")
    return folder


def words_in_time_order(rows: list[dict]) -> list[str]:
    words = [w for r in rows if r["words"] for w in r["words"]]
    return [w["word"] for w in sorted(words, key=lambda w: (w["start"], w["end"]))]


def check_cues(cues: list[tuple[int, int, list[str]]]) -> None:
    """The cue rules, on (start ms, end ms, lines) as a parser read them back."""
    previous_end = 0
    for start, end, lines in cues:
        assert previous_end <= start < end, (start, end)
        assert end - start <= RULES.max_duration * 1000
        assert 1 <= len(lines) <= RULES.max_lines and all(0 < len(line) <= RULES.max_line_width for line in lines)
        if len(lines) == 2:  # the most even split of the cue's words; of equals, one with the shorter line on top
            words = " ".join(lines).split()
            splits = [(len(" ".join(words[:k])), len(" ".join(words[k:]))) for k in range(1, len(words))]
            best = min((max(s), s[0] > s[1]) for s in splits)
            assert (max(map(len, lines)), len(lines[0]) > len(lines[1])) == best
        previous_end = end


# --- SRT and WebVTT ---------------------------------------------------------------------------------


def test_srt_cues_keep_every_word_within_the_limits(tmp_path):
    audio = tmp_path / "talk.wav"
    rows = [
        row("t0", audio, TALK, offset=0.0, duration=40.0),
        row("t1", audio, " ".join(TALK.split()[:12]), offset=40.0, duration=12.0),  # slow speech: 1 s a word
    ]
    run = make_run(tmp_path / "run", [rows])
    result = convert(run, "srt", tmp_path / "subs")
    assert [p.name for p in result.written.files] == ["talk.srt"]
    cues = list(srt.parse((tmp_path / "subs/talk.srt").read_text(encoding="utf-8"), ignore_errors=False))
    assert [c.index for c in cues] == list(range(1, len(cues) + 1))
    check_cues([(c.start // _MS, c.end // _MS, c.content.split("\n")) for c in cues])
    assert " ".join(c.content.replace("\n", " ") for c in cues).split() == words_in_time_order(rows)
    assert any(c.content.count("\n") == 1 for c in cues), "long speech fills two-line cues"
    assert max((c.end - c.start).total_seconds() for c in cues) > 6, "slow speech meets the 7 s limit"
    assert result.written.words == len(TALK.split()) + 12 and result.skipped == ()


def test_vtt_reads_back_with_webvtt_and_escapes_markup(tmp_path):
    audio = tmp_path / "news.flac"
    text = TALK + " at&t <b>bold</b> claims"
    run = make_run(tmp_path / "run", [[row("n0", audio, text, duration=50.0)]])
    convert(run, "vtt", tmp_path / "subs")
    path = tmp_path / "subs/news.vtt"
    raw = path.read_text(encoding="utf-8")
    assert raw.startswith("WEBVTT\n\n") and re.search(
        r"^\d{2}:\d{2}:\d{2}\.\d{3} --> \d{2}:\d{2}:\d{2}\.\d{3}$", raw, re.M
    )
    captions = webvtt.read(str(path)).captions
    shown = [[html.unescape(line) for line in c.lines] for c in captions]  # widths count what a viewer sees
    check_cues([(c.start_time.in_milliseconds(), c.end_time.in_milliseconds(), s) for c, s in zip(captions, shown)])
    assert " ".join(" ".join(lines) for lines in shown).split() == text.split()
    assert "<" not in raw.split("-->")[-1] and "at&amp;t &lt;b&gt;bold&lt;/b&gt;" in raw


def test_pauses_and_sentence_ends_start_new_cues():
    words = [
        Word("we", 0.0, 0.2, 0.9),
        Word("stop.", 0.3, 0.6, 0.9),  # a sentence ends
        Word("then", 0.7, 0.9, 0.9),
        Word("wait", 1.0, 1.2, 0.9),
        Word("again", 2.8, 3.1, 0.9),  # after 1.6 s of silence
    ]
    cues = build_cues(words)
    assert [c.text for c in cues] == ["we stop.", "then wait", "again"]
    assert cues[1].end_ms <= 2800 and cues[2].start_ms == 2800
    assert [c.text for c in build_cues(words, CueRules(pause=2.0))] == ["we stop.", "then wait again"]


def test_cue_times_are_monotonic_with_zero_length_and_overlapping_words():
    words = [
        Word("one", 1.0, 1.0, 0.9),  # end == start: lasts 20 ms, then held to 0.8 s as the next cue is far
        Word("two.", 5.0, 5.3, 0.9),  # ends a sentence, and its cue ends where the next starts (5.2 s)
        Word("three", 5.31, 5.31, 0.9),
        Word("four", 5.2, 5.9, 0.9),  # overlaps "two." (overlapping segments): shown once, in time order
    ]
    cues = build_cues(words)
    assert [c.text for c in cues] == ["one", "two.", "four three"]
    assert [(c.start_ms, c.end_ms) for c in cues] == [(1000, 1800), (5000, 5200), (5200, 6000)]
    assert build_cues([Word("x", 2.0, 1.5, 0.9)])[0].end_ms == 2800  # an end before the start: the same rule


def test_timestamps_are_formatted_for_each_format():
    assert timestamp(0, ",") == "00:00:00,000"
    assert timestamp(3_661_005, ",") == "01:01:01,005"
    assert timestamp(100 * 3_600_000 + 59_999, ".") == "100:00:59.999"


def test_segments_of_one_file_merge_in_time_order(tmp_path):
    audio = tmp_path / "lecture.wav"
    parts = TALK.split()
    late = row("c", audio, " ".join(parts[40:]), offset=24.0, duration=12.0)
    early = row("a", audio, " ".join(parts[:20]), offset=0.0, duration=12.0)
    middle = row("b", audio, " ".join(parts[20:40]), offset=12.0, duration=12.0)
    run = make_run(tmp_path / "run", [[late], [early], [middle]])  # shards out of time order
    for fmt in ("srt", "ctm"):
        convert(run, fmt, tmp_path / fmt)
    cues = list(srt.parse((tmp_path / "srt/lecture.srt").read_text()))
    assert " ".join(c.content.replace("\n", " ") for c in cues).split() == parts
    check_cues([(c.start // _MS, c.end // _MS, c.content.split("\n")) for c in cues])
    ctm = [CTM_LINE.fullmatch(line) for line in (tmp_path / "ctm/run.ctm").read_text().splitlines()]
    assert [m["word"] for m in ctm] == parts and {m["id"] for m in ctm} == {"lecture"}


def test_same_stem_files_get_distinct_names_that_do_not_change(tmp_path):
    paths = [tmp_path / "a/intro.wav", tmp_path / "b/intro.wav", tmp_path / "b/INTRO.flac", tmp_path / "c/outro.wav"]
    rows = [row(f"r{i}", p, f"file number {i} speaks", duration=2.0) for i, p in enumerate(paths)]
    run = make_run(tmp_path / "run", [rows])
    first = convert(run, "srt", tmp_path / "one")
    again = convert(run, "srt", tmp_path / "two")
    names = sorted(p.name for p in first.written.files)
    assert names == sorted(p.name for p in again.written.files) and len(set(n.casefold() for n in names)) == 4
    assert "outro.srt" in names and all(re.fullmatch(r"(intro|INTRO)-[0-9a-f]{8}\.srt", n) for n in names[:3])
    ids = file_ids(str(p) for p in paths)
    for i, p in enumerate(paths):  # each file holds its own audio's words
        cues = list(srt.parse((tmp_path / "one" / f"{ids[str(p)]}.srt").read_text()))
        assert cues[0].content == f"file number {i} speaks"


def test_file_ids_replace_whitespace_and_keep_unique_stems():
    ids = file_ids(["/x/my talk.wav", "/x/other.wav", "/y/my_talk.wav"])
    assert ids["/x/other.wav"] == "other"
    assert ids["/x/my talk.wav"] != ids["/y/my_talk.wav"] and all(" " not in i for i in ids.values())
    assert file_ids(["/data/a/intro.wav", "/data/b/intro.wav"]) == {  # the example in docs/outputs.md
        "/data/a/intro.wav": "intro-93d598f4",
        "/data/b/intro.wav": "intro-88a852d9",
    }


# --- CTM and the NeMo manifest ----------------------------------------------------------------------


def test_ctm_lines_follow_the_nist_grammar_sorted_by_file_then_start(tmp_path):
    rows = [
        row("z", tmp_path / "zeta.wav", "last file first in the manifest", offset=3.0, duration=4.0),
        row("a1", tmp_path / "alpha.wav", "second segment of alpha", offset=5.0, duration=3.0),
        row("a0", tmp_path / "alpha.wav", "alpha begins here", offset=0.0, duration=3.0),
    ]
    rows[2]["words"][0]["end"] = rows[2]["words"][0]["start"]  # a zero-length word
    run = make_run(tmp_path / "run", [rows])
    result = convert(run, "ctm", tmp_path / "out")
    lines = (tmp_path / "out/run.ctm").read_text().splitlines()
    matches = [CTM_LINE.fullmatch(line) for line in lines]
    assert all(matches), [line for line, m in zip(lines, matches) if not m]
    keys = [(m["id"], float(m["start"])) for m in matches]
    assert keys == sorted(keys) and [k[0] for k in keys[:7]] == ["alpha"] * 7
    assert all(float(m["dur"]) >= 0.02 for m in matches) and float(matches[0]["dur"]) == 0.02
    words = [w for r in rows for w in r["words"]]
    assert len(lines) == result.written.words == len(words)
    assert sorted((m["word"], m["start"]) for m in matches) == sorted((w["word"], f"{w['start']:.3f}") for w in words)
    assert all(0 <= float(m["conf"]) <= 1 for m in matches)


def test_manifest_is_read_back_by_nemo(tmp_path):
    from nemo.collections.asr.parts.utils.manifest_utils import read_manifest

    audio = tmp_path / "call.wav"
    rows = [
        row("u0", audio, "hello there how are you", offset=0.0, duration=4.0, reference="hello there how are you"),
        row("u1", audio, "i am fine thanks", offset=4.0, duration=3.0, reference=None),
        error_row("u2", audio, "audio unreadable"),
    ]
    run = make_run(tmp_path / "run", [rows])
    result = convert(run, "manifest", tmp_path / "out")
    items = read_manifest(tmp_path / "out/run.jsonl")
    assert [i["id"] for i in items] == ["u0", "u1"] and [s.id for s in result.skipped] == ["u2"]
    first, second = items
    assert first["text"] == "hello there how are you" and "text" not in second  # a reference only when given
    assert second["pred_text"] == "i am fine thanks" and second["offset"] == 4.0 and second["duration"] == 3.0
    assert second["words"] == "i am fine thanks".split() and second["confidence"] == 0.9
    assert second["word_confidence"] == [w["confidence"] for w in rows[1]["words"]]
    # NeMo's word timestamps: seconds from the segment's start
    assert [round(w["start"] + second["offset"], 3) for w in second["word"]] == [w["start"] for w in rows[1]["words"]]
    assert [w["word"] for w in second["word"]] == second["words"] and second["audio_filepath"] == str(audio)


# --- skipped rows, runs without timestamps, folders that are not runs (through the CLI) ----------------


def cli(capsys, *args) -> tuple[int, str, str]:
    code = main(["--quiet", "convert", *map(str, args)])
    out, err = capsys.readouterr()
    return code, out, err


def test_error_rows_are_skipped_and_reported(tmp_path, capsys):
    good, bad = tmp_path / "good.wav", tmp_path / "bad.wav"
    rows = [row("g", good, "this one is fine"), error_row("e1", bad, "not an audio file"), error_row("e2", bad, "x")]
    run = make_run(tmp_path / "run", [rows])
    code, out, err = cli(capsys, run, "--to", "vtt", "--out", tmp_path / "out")
    assert code == 0
    assert f"skipped e1 ({bad}): status error: e1 ({bad}): not an audio file" in err and "skipped e2" in err
    assert out.strip() == f"wrote {tmp_path / 'out/good.vtt'} (1 utterances, 4 words); skipped 2 rows"
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["good.vtt"]


def test_runs_without_timestamps_convert_only_to_a_manifest(tmp_path, capsys):
    rows = [row(f"q{i}", tmp_path / f"q{i}.wav", "no times here", words=False) for i in range(3)]
    run = make_run(tmp_path / "run", [rows])
    for fmt in ("srt", "vtt", "ctm"):
        code, out, err = cli(capsys, run, "--to", fmt, "--out", tmp_path / fmt)
        assert code == 2 and out == "" and not (tmp_path / fmt).exists()
        assert str(run) in err and "timestamps: true" in err and "--to manifest" in err
    code, out, _ = cli(capsys, run, "--to", "manifest", "--out", tmp_path / "m")
    assert code == 0 and "(3 utterances, 0 words)" in out
    items = [json.loads(line) for line in (tmp_path / "m/run.jsonl").read_text().splitlines()]
    assert [i["pred_text"] for i in items] == ["no times here"] * 3
    assert not any({"word", "words", "word_confidence", "confidence"} & i.keys() for i in items)


def test_rows_without_words_in_a_timed_run_are_skipped(tmp_path):
    rows = [row("w", tmp_path / "a.wav", "with times"), row("n", tmp_path / "a.wav", "without", offset=20, words=False)]
    result = convert(make_run(tmp_path / "run", [rows]), "srt", tmp_path / "out")
    assert [(s.id, "timestamps: false" in s.reason) for s in result.skipped] == [("n", True)]
    assert result.written.words == 2


def test_a_run_made_before_word_columns_existed(tmp_path, capsys):
    run = make_run(tmp_path / "run", [])
    old = [{k: v for k, v in row("o", tmp_path / "o.wav", "old run").items() if k not in ("words", "confidence")}]
    (run / "transcripts").mkdir()
    pq.write_table(pa.Table.from_pylist([{**old[0], "shard": 0}]), run / "transcripts/part-00000.parquet")
    (run / "job.json").write_text(json.dumps({"plan": [{"shard": 0}]}))
    assert cli(capsys, run, "--to", "srt", "--out", tmp_path / "s")[0] == 2
    code, out, _ = cli(capsys, run, "--to", "manifest", "--out", tmp_path / "m")
    assert code == 0 and json.loads((tmp_path / "m/run.jsonl").read_text())["pred_text"] == "old run"


def test_folders_that_are_not_runs_exit_2_naming_them(tmp_path, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    code, _, err = cli(capsys, empty, "--to", "srt", "--out", tmp_path / "o")
    assert code == 2 and f"{empty}: not a run folder (no job.json)" in err
    no_parts = make_run(tmp_path / "no-parts", [], finished=False, planned=2)
    code, _, err = cli(capsys, no_parts, "--to", "ctm", "--out", tmp_path / "o")
    assert code == 2 and f"{no_parts}: the run has no transcripts yet" in err and "--resume" in err
    failed = make_run(tmp_path / "failed", [[error_row("e", tmp_path / "e.wav", "broken")]])
    code, _, err = cli(capsys, failed, "--to", "manifest", "--out", tmp_path / "o")
    assert code == 2 and "no row to convert: all 1 rows have status error" in err and "--retry-errors" in err
    run = make_run(tmp_path / "run", [[row("r", tmp_path / "r.wav", "fine")]])
    code, _, err = cli(capsys, run, "--to", "txt", "--out", tmp_path / "o")
    assert code == 2 and "--to txt: not a format; choose one of srt, vtt, ctm, manifest" in err
    assert not (tmp_path / "o").exists()
    (tmp_path / "file").write_text("")
    code, _, err = cli(capsys, run, "--to", "srt", "--out", tmp_path / "file")
    assert code == 2 and f"--out {tmp_path / 'file'}: a file, not a folder" in err


def test_an_unfinished_run_converts_what_it_has_and_warns(tmp_path, capsys):
    rows = [[row("p0", tmp_path / "p.wav", "first part")], [row("p1", tmp_path / "p.wav", "second", offset=10)]]
    run = make_run(tmp_path / "run", rows, finished=False, planned=3)
    code, out, err = cli(capsys, run, "--to", "srt", "--out", tmp_path / "out")
    assert code == 0 and "(2 utterances, 3 words)" in out
    assert f"warning: {run} is unfinished (no _SUCCESS; 2 of 3 parts written)" in err and "--resume" in err


@pytest.mark.parametrize(
    "fmt, name", [("srt", "a.srt"), ("vtt", "a.vtt"), ("ctm", "run.ctm"), ("manifest", "run.jsonl")]
)
def test_every_format_writes_into_a_new_out_folder(tmp_path, capsys, fmt, name):
    run = make_run(tmp_path / "run", [[row("a", tmp_path / "a.wav", "some words here")]])
    code, out, err = cli(capsys, run, "--to", fmt, "--out", tmp_path / "new/deeper")
    assert code == 0 and err == "" and (tmp_path / "new/deeper" / name).is_file()
    assert out.strip() == f"wrote {tmp_path / 'new/deeper' / name} (1 utterances, 3 words)"
