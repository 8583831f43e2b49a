"""One name per audio file: the stem of its subtitle files and its file id in CTM.

The name is the audio file's stem with whitespace replaced by `_` (CTM fields are separated by
whitespace). Two different audio files whose names would be equal (compared case-insensitively, as
macOS and Windows file systems do) each get `-` and the first 8 hex digits of the SHA-1 of their full
path appended: `/data/a/intro.wav` and `/data/b/intro.wav` become `intro-93d598f4` and
`intro-88a852d9`, the same in every conversion, while a stem no other file shares stays as it is.
"""

from __future__ import annotations

import hashlib
import re
from collections import Counter
from collections.abc import Iterable
from pathlib import PurePath

_WHITESPACE = re.compile(r"\s+")


def file_ids(audio_filepaths: Iterable[str]) -> dict[str, str]:
    """audio_filepath -> its name, unique (case-insensitively) among `audio_filepaths`."""
    paths = sorted(set(audio_filepaths))
    stems = {p: _stem(p) for p in paths}
    taken = Counter(s.casefold() for s in stems.values())
    return {p: s if taken[s.casefold()] == 1 else f"{s}-{_short_hash(p)}" for p, s in stems.items()}


def _stem(path: str) -> str:
    stem = _WHITESPACE.sub("_", PurePath(path).stem.strip()) or "audio"
    return stem.lstrip(".") or "audio"  # never a hidden file


def _short_hash(path: str) -> str:
    return hashlib.sha1(path.encode()).hexdigest()[:8]
