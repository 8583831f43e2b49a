"""A manifest repeated N times with new ids (`r<k>-<id>`), so that a job runs long enough to measure.

Used by vs_peers.py (its job and scaling manifests, via vs_peers_jobs.py) and int8_job.py. Each line
keeps the source item's `audio_filepath` (absolute, as `iter_manifest` resolves it), `duration` and
`text`. (first_run.write_manifest is a different thing: the bundled test set cut to a number of hours.)
"""

from __future__ import annotations

import json
from pathlib import Path

from runner.inputs.manifest import iter_manifest


def repeated_manifest(src: Path, repeat: int, path: Path) -> tuple[list[str], float]:
    """`src` repeated `repeat` times with new ids; returns the audio paths and audio seconds."""
    items = list(iter_manifest(str(src)))
    paths, seconds = [], 0.0
    with open(path, "w") as f:
        for r in range(repeat):
            for item in items:
                f.write(
                    json.dumps(
                        {
                            "audio_filepath": item.audio_filepath,
                            "duration": item.duration,
                            "text": item.text,
                            "id": f"r{r}-{item.id}",
                        }
                    )
                    + "\n"
                )
                paths.append(item.audio_filepath)
                seconds += item.duration
    return paths, seconds
