"""Exporting a finished run to the formats people deliver: a run folder's rows for export (`rows`), the
per-audio-file names (`names`), subtitle cues (`cues`), SRT and WebVTT (`subtitles`), NIST CTM (`ctm`)
and NeMo JSONL manifests (`manifest`); CTM and manifests are streamed to disk (`output`).

Torch-free: reads the run folder's Parquet parts with pyarrow only (no NeMo, no Ray).
"""

from runner.export.ctm import write_ctm
from runner.export.cues import Cue, CueRules, build_cues
from runner.export.manifest import write_manifest
from runner.export.names import file_ids
from runner.export.rows import RunRows, Skipped, Utterance, Word, Written, read_run
from runner.export.subtitles import write_subtitles

__all__ = [
    "Cue",
    "CueRules",
    "RunRows",
    "Skipped",
    "Utterance",
    "Word",
    "Written",
    "build_cues",
    "file_ids",
    "read_run",
    "write_ctm",
    "write_manifest",
    "write_subtitles",
]
