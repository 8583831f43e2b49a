"""WER/CER scoring time for one long recording with its reference (issue 17).

    .venv/bin/python benchmarks/scoring.py [--hours 3] [--rounds 5]

Prints figures; not a test. The reference is `--hours` of text at 150 words a minute (corpus
sentences); the hypothesis has ~10% of its words changed, dropped or doubled, as a weak model
would. The statistic, fixed before the run: the median of `--rounds` timings of `wer` + `cer`
(the driver scores both after the last part), with min and max.
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from runner.metrics import cer, normalize_text, wer  # noqa: E402
from runner.sysinfo import cpu_info, int8_flags  # noqa: E402
from runner.training.corpus import sentences  # noqa: E402


def texts(hours: float, seed: int = 0) -> tuple[str, str]:
    words: list[str] = []
    target = int(hours * 60 * 150)
    pool = sentences(2000, seed=seed)
    while len(words) < target:
        words += normalize_text(pool[len(words) % len(pool)]).split()
    words = words[:target]
    rng = random.Random(seed)
    hyp = []
    for w in words:
        roll = rng.random()
        hyp += [] if roll < 0.03 else [w, w] if roll < 0.05 else [w[:-1] or "a"] if roll < 0.10 else [w]
    return " ".join(words), " ".join(hyp)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hours", type=float, default=3.0)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    ref, hyp = texts(args.hours)
    seconds, figures = [], None
    for _ in range(args.rounds):
        t0 = time.perf_counter()
        figures = (wer([ref], [hyp]), cer([ref], [hyp]))
        seconds.append(time.perf_counter() - t0)
    cpu = cpu_info()
    print(f"CPU: {cpu['model']}, flags {' '.join(int8_flags()) or '(no AVX-512/VNNI/AMX)'}")
    print(
        f"one {args.hours:g} h recording: {len(ref.split())} reference words, {len(ref)} characters; "
        f"WER {figures[0]:.4f}, CER {figures[1]:.4f}"
    )
    print(
        f"WER + CER scoring time, median of {args.rounds}: {statistics.median(seconds):.3f} s "
        f"(min {min(seconds):.3f}, max {max(seconds):.3f})"
    )


if __name__ == "__main__":
    main()
