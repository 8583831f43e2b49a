"""Manifest reading, shard planning and job specs: validation errors name file:line or the key."""

import gzip
import json

import numpy as np
import pytest
import soundfile as sf

from runner.errors import ManifestError
from runner.inputs.manifest import check_unique_ids, iter_manifest
from runner.job.shards import group_items, plan_shards
from runner.job.spec import JobSpec, SpecError, load_spec
from runner.model.words import ConfidenceMethod

from .support import write_manifest


def test_reads_nemo_jsonl_with_relative_paths_bom_crlf_blank_lines_and_gz(tmp_path):
    sf.write(tmp_path / "a.wav", np.zeros(8000, np.float32), 16000)
    lines = [
        json.dumps({"audio_filepath": "a.wav", "text": "hi"}),
        "",
        json.dumps({"audio_filepath": "a.wav", "duration": 0.25, "offset": 0.1, "id": 7}),
    ]
    plain = write_manifest(tmp_path / "m.jsonl", lines, newline="\r\n", bom=True)
    items = list(iter_manifest(plain))
    assert [i.line for i in items] == [1, 3]
    assert items[0].audio_filepath == str(tmp_path / "a.wav") and items[0].duration == pytest.approx(0.5)
    assert (items[0].id, items[1].id, items[1].offset, items[1].text) == ("L00000001", "7", 0.1, None)
    gz = tmp_path / "m.jsonl.gz"
    gz.write_bytes(gzip.compress(plain.read_bytes()))
    assert list(iter_manifest(gz)) == items


@pytest.mark.parametrize(
    "line,message",
    [
        ('{"audio_filepath": "a.wav"', "invalid JSON"),
        ('["a.wav"]', "expected a JSON object, got list"),
        ('{"text": "no path"}', "missing `audio_filepath`"),
        ('{"audio_filepath": "a.wav", "duration": "long"}', "`duration` must be a non-negative number"),
        ('{"audio_filepath": "a.wav", "offset": -1}', "`offset` must be a non-negative number"),
        ('{"audio_filepath": "a.wav", "text": 5}', "`text` must be a string"),
        ('{"audio_filepath": "a.wav", "id": [1]}', "`id` must be a non-empty string or integer"),
    ],
)
def test_malformed_line_names_file_and_line(tmp_path, line, message):
    path = write_manifest(tmp_path / "bad.jsonl", ['{"audio_filepath": "a.wav", "duration": 1}', line])
    with pytest.raises(ManifestError, match=rf"bad.jsonl:2: {message}"):
        list(iter_manifest(path))


def test_duplicate_ids_name_both_lines(tmp_path):
    path = write_manifest(
        tmp_path / "d.jsonl", [json.dumps({"audio_filepath": f"{i}.wav", "duration": 1, "id": i % 2}) for i in range(3)]
    )
    with pytest.raises(ManifestError, match=r"d.jsonl:3: duplicate id '0' \(first on line 1\)"):
        list(check_unique_ids(iter_manifest(path), path))


def test_shard_plan_is_duration_balanced_deterministic_and_groups_stream(tmp_path):
    rows = [json.dumps({"audio_filepath": f"{i}.wav", "duration": 1.0 + (i % 5)}) for i in range(100)]
    path = write_manifest(tmp_path / "m.jsonl", rows)
    plan = plan_shards(iter_manifest(path), 30)
    assert plan == plan_shards(iter_manifest(path), 30)
    assert sum(s.items for s in plan) == 100 and all(30 <= s.seconds < 35 for s in plan[:-1])
    assert [s.index for s in plan] == list(range(len(plan)))
    groups = list(group_items(iter_manifest(path), plan, {1, 3}))
    assert [g[0].index for g in groups] == [1, 3]
    for shard, items in groups:
        assert [i.line for i in items] == list(range(shard.first_line, shard.last_line + 1))


def spec_file(tmp_path, text):
    path = tmp_path / "job.yaml"
    path.write_text(text)
    return path


def test_spec_resolves_paths_and_round_trips(tmp_path):
    path = spec_file(
        tmp_path,
        "model: m.nemo\nmanifest: data/m.jsonl\noutput: runs/x\nprecision: fp32\nquantization:\n  engine: onednn\n",
    )
    spec = load_spec(path, workers=3)
    assert spec.manifest == str(tmp_path / "data/m.jsonl") and spec.workers == 3
    assert spec.quantization.engine == "onednn"
    assert spec.timestamps and spec.confidence == ConfidenceMethod()  # NeMo's confidence defaults
    assert JobSpec.from_dict(json.loads(json.dumps(spec.to_dict()))) == spec
    custom = load_spec(spec_file(tmp_path, "model: m\nmanifest: x\noutput: o\nconfidence: {method: max_prob}\n"))
    assert custom.confidence.method == "max_prob" and custom.confidence.aggregation == "min"
    assert JobSpec.from_dict(json.loads(json.dumps(custom.to_dict()))) == custom


@pytest.mark.parametrize(
    "text,message",
    [
        ("model: m\nmanifest: x\noutput: o\nshards: 3\n", r"unknown key\(s\) shards; allowed:"),
        ("model: m\nmanifest: x\noutput: o\nquantization: {engin: x}\n", r"unknown key\(s\) quantization.engin"),
        ("model: m\nmanifest: x\n", r"missing required key\(s\): output"),
        ("model: m\nmanifest: x\noutput: o\nprecision: int4\n", "precision must be one of int8, fp32"),
        ("model: m\nmanifest: x\noutput: o\nmax_failed: 2.5\n", "max_failed must be a fraction"),
        ("model: m\nmanifest: x\noutput: o\nworkers: 0\n", "workers must be a positive integer"),
        ("model: m\nmanifest: x\noutput: o\ntimestamps: yes please\n", "timestamps must be true or false"),
        ("model: m\nmanifest: x\noutput: o\nconfidence: {method: entropie}\n", "confidence.method must be one of"),
        ("model: m\nmanifest: x\noutput: o\nconfidence: {alpha: 0}\n", r"confidence.alpha must be a number > 0"),
        ("model: m\nmanifest: x\noutput: o\nconfidence: {aggregate: min}\n", r"unknown key\(s\) confidence.aggregate"),
        ("model: m\nmanifest: x\noutput: o\nconfidence: min\n", "confidence must be a mapping"),
        ("- just a list\n", "a job spec is a mapping"),
    ],
)
def test_spec_errors_name_the_key(tmp_path, text, message):
    with pytest.raises(SpecError, match=message):
        load_spec(spec_file(tmp_path, text))


def test_error_budget_is_fraction_or_count():
    spec = JobSpec(model="m", manifest="x", output="o", max_failed=0.01)
    assert spec.max_failed_items(1000) == 10
    assert JobSpec(model="m", manifest="x", output="o", max_failed=3).max_failed_items(1000) == 3
