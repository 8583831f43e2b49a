"""Samples of a manifest for int8: calibration and held-out gate audio, drawn reproducibly and kept apart.

Files longer than `max_seconds` take part as consecutive windows of that length, so a sample is
uniform over stretches of audio; calibration and gate never share audio; each sample carries
spares used in order when an item cannot be read. Used by `runner.int8.pipeline` on the driver.
"""

from __future__ import annotations

import math
import os
import random
import stat
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, replace

import numpy as np

from runner.errors import AudioLoadError, InputError
from runner.inputs.audio import load_audio
from runner.inputs.manifest import ManifestItem, iter_manifest
from runner.int8.config import Settings


@dataclass
class Samples:
    calibration: list[ManifestItem]  # candidates in sampled order, with spares for unreadable items
    gate: list[ManifestItem]
    calibration_items: int  # how many of each to use
    gate_items: int


MIN_WINDOW = 2.0  # seconds: the last window of a long item is left out when shorter than this


def _with_spares(k: int) -> int:
    return k + k // 10 + 5


def draw_samples(manifest: str, calibration_manifest: str | None, settings: Settings) -> Samples:
    """Reproducible samples (seeded reservoir, one streaming pass): calibration and gate never share audio.

    Without a separate calibration manifest both come from `manifest`, disjoint. An item longer than
    `max_seconds` is offered as its consecutive windows of that length (`_windows`), so the sample is
    uniform over stretches of audio: windows of one long file may land in both samples, never the same
    window. Each sample carries spares, used in order when an item cannot be read.
    """
    want_cal, want_gate = settings.calibration_items, settings.gate_items
    if calibration_manifest is None:
        both = _reservoir(manifest, _with_spares(want_cal + want_gate), settings)
        if len(both) < 2:
            raise InputError(
                f"{manifest}: int8 calibration needs at least 2 readable items (one to calibrate, "
                "one to check accuracy); the manifest has fewer"
            )
        # Gate candidates first, the rest calibrate; spares (and a small manifest) split in proportion.
        n_gate = min(len(both) - 1, max(1, len(both) * want_gate // (want_cal + want_gate)))
        calibration, gate = _apart(both[n_gate:], both[:n_gate], settings.max_seconds), both[:n_gate]
        if not calibration:
            raise InputError(
                f"{manifest}: every item to calibrate on has audio the accuracy check also uses "
                "(the same file listed more than once?)"
            )
        return Samples(calibration, gate, want_cal, want_gate)
    calibration = _reservoir(calibration_manifest, _with_spares(want_cal), settings)
    gate = _apart(_reservoir(manifest, _with_spares(want_gate), settings, salt=1), calibration, settings.max_seconds)
    if not calibration or not gate:
        empty = calibration_manifest if not calibration else manifest
        raise InputError(f"{empty}: no items to {'calibrate on' if not calibration else 'check accuracy on'}")
    return Samples(calibration, gate, want_cal, want_gate)


def _reservoir(path: str, k: int, settings: Settings, salt: int = 0) -> list[ManifestItem]:
    """k items drawn uniformly from the short items and the long items' windows of `path`, in O(k) memory."""
    rng = random.Random(f"{settings.seed}:{salt}")
    picked: list[ManifestItem] = []
    seen = 0
    for item in iter_manifest(path):
        for unit in _windows(item, settings.max_seconds):
            seen += 1
            _offer(picked, unit, seen, k, rng)
    picked.sort(key=lambda i: (i.line, i.offset))
    random.Random(f"{settings.seed}:{salt}:order").shuffle(picked)
    return picked


def _windows(item: ManifestItem, max_seconds: float) -> Iterator[ManifestItem]:
    """`item` when it lasts at most `max_seconds` (or its length is unknown), else its consecutive windows
    of `max_seconds` (the last one kept when it lasts at least `MIN_WINDOW`), id `id@start s`, with no
    reference text: the manifest's belongs to the whole item, so a gate with windows measures agreement."""
    if item.duration is None or item.duration <= max_seconds or max_seconds <= 0:
        yield item
        return
    k = 0
    while (length := min(max_seconds, item.duration - k * max_seconds)) >= min(MIN_WINDOW, max_seconds):
        start = item.offset + k * max_seconds
        yield replace(item, id=f"{item.id}@{start:.1f}s", offset=start, duration=float(length), text=None)
        k += 1


def _offer(pool: list, item, seen: int, k: int, rng: random.Random) -> None:
    if len(pool) < k:
        pool.append(item)
    else:
        j = rng.randrange(seen)
        if j < k:
            pool[j] = item


def _apart(items: Sequence[ManifestItem], taken: Sequence[ManifestItem], max_seconds: float) -> list[ManifestItem]:
    """`items` less those whose audio (what `read_items` reads) overlaps audio of `taken` in the same file."""
    spans: dict[str, list[tuple[float, float]]] = {}
    for i in taken:
        spans.setdefault(i.audio_filepath, []).append(_span(i, max_seconds))
    return [
        i
        for i in items
        if not any(
            a < end and start < b for start, end in spans.get(i.audio_filepath, ()) for a, b in [_span(i, max_seconds)]
        )
    ]


def _span(item: ManifestItem, max_seconds: float) -> tuple[float, float]:
    length = item.duration if item.duration else math.inf  # none or 0: to the end of the file
    return item.offset, item.offset + min(length, max_seconds)


def read_items(
    items: Sequence[ManifestItem], rate: int, max_seconds: float, limit: int | None = None
) -> tuple[list[np.ndarray], list[ManifestItem], list[str]]:
    """Audio of the first `limit` readable items (cut to `max_seconds`); the items kept; reasons for the skipped ones.

    A path that is not a regular file (a FIFO, a device, a folder) is skipped without being opened."""
    audios, kept, skipped = [], [], []
    for item in items:
        if limit is not None and len(kept) >= limit:
            break
        try:
            if not stat.S_ISREG(os.stat(item.audio_filepath).st_mode):
                skipped.append(f"id {item.id}: {item.audio_filepath}: not a regular file")
                continue
        except OSError:
            pass  # load_audio says what is wrong with it
        try:
            audio = load_audio(item.audio_filepath, rate, item.offset, item.duration)
        except AudioLoadError as exc:
            skipped.append(f"id {item.id}: {exc}")
            continue
        if len(audio) < 400:
            skipped.append(f"id {item.id}: shorter than one analysis window")
            continue
        audios.append(audio[: int(max_seconds * rate)])
        kept.append(item)
    return audios, kept, skipped
