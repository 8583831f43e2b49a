"""`asr-runner`: the command line. Thin: parse, call one library function, render the result.

Only this module prints and owns `rich`; library code logs.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path
from typing import Optional, Sequence

from . import __version__
from .errors import AudioLoadError, RunnerError

log = logging.getLogger("runner")


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    _setup_logging(args.verbose, args.quiet)
    try:
        return args.func(args)
    except RunnerError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


def _parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    # SUPPRESS: a flag given before or after the subcommand both count (argparse would
    # otherwise let the subcommand's default overwrite the top-level value).
    common.add_argument("--quiet", action="store_true", default=argparse.SUPPRESS,
                        help="log lines only, no live display")
    common.add_argument("--verbose", action="store_true", default=argparse.SUPPRESS, help="debug logging")
    parser = argparse.ArgumentParser(prog="asr-runner", parents=[common],
                                     description="int8 batch transcription of NeMo CTC models on CPU")
    parser.set_defaults(quiet=False, verbose=False)
    parser.add_argument("--version", action="version", version=f"asr-runner {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("transcribe", parents=[common], help="transcribe audio files with the lean fp32 model")
    p.add_argument("model", help=".nemo file or lean checkpoint (from `asr-runner export`)")
    p.add_argument("audio", nargs="+", help="audio files (anything libsndfile reads)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--window-seconds", type=float, default=40.0, help="longer files go in windows of this size")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    p.set_defaults(func=_cmd_transcribe)

    p = sub.add_parser("run", parents=[common], help="run (or resume) a transcription job from a YAML spec")
    p.add_argument("spec", help="job spec (YAML), see jobs/")
    p.add_argument("--out", help="output directory (overrides `output`)")
    p.add_argument("--resume", action="store_true", help="continue the job in --out: run only missing parts")
    p.add_argument("--retry-errors", action="store_true", help="re-run only error rows, rewriting their parts")
    p.add_argument("--address", help="join an existing Ray cluster (default: RAY_ADDRESS, else start locally)")
    p.add_argument("--workers", type=int, help="Ray worker actors (default: one per CPU / threads_per_worker)")
    p.add_argument("--precision", choices=["int8", "fp32"])
    p.set_defaults(func=_cmd_run)

    p = sub.add_parser("export", parents=[common], help="write a .nemo model as a lean checkpoint (no NeMo needed to load)")
    p.add_argument("model", help=".nemo file")
    p.add_argument("--out", required=True, help="output file")
    p.set_defaults(func=_cmd_export)
    return parser


def _setup_logging(verbose: bool, quiet: bool) -> None:
    """Log lines on stderr; on a terminal (and not --quiet) through rich, above the live display."""
    level = logging.DEBUG if verbose else logging.INFO
    if quiet or not sys.stdout.isatty():
        handler: logging.Handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    else:
        from rich.logging import RichHandler

        handler = RichHandler(console=_console(), show_path=False, markup=False)
    handler._asr_runner = True  # type: ignore[attr-defined]
    root = logging.getLogger()
    root.handlers[:] = [h for h in root.handlers if not getattr(h, "_asr_runner", False)] + [handler]
    root.setLevel(logging.WARNING)
    logging.getLogger("runner").setLevel(level)
    from .nemo_loader import quiet_nemo_logging

    quiet_nemo_logging(verbose)


def _cmd_transcribe(args) -> int:
    import torch

    from .audio import load_audio
    from .nemo_loader import load_any
    from .transcribe import DecodeOptions, transcribe_batch

    if args.threads:
        torch.set_num_threads(args.threads)
    model = load_any(args.model)
    rate = model.spec.features.sample_rate
    options = DecodeOptions(batch_size=args.batch_size, window_seconds=args.window_seconds)
    failed = 0
    for path in args.audio:
        try:
            audio = load_audio(path, rate)
        except AudioLoadError as exc:
            print(f"{path}\tERROR\t{exc}", file=sys.stderr)
            failed += 1
            continue
        start = time.perf_counter()
        text = transcribe_batch(model, [audio], options)[0]
        log.info("%s: %.1f s audio in %.2f s", path, len(audio) / rate, time.perf_counter() - start)
        print(f"{path}\t{text}")
    return 1 if failed else 0


def _cmd_run(args) -> int:
    from .jobs import run_job
    from .spec import load_spec

    out = str(Path(args.out).resolve()) if args.out else None
    spec = load_spec(args.spec, output=out, workers=args.workers, precision=args.precision)
    progress = _progress(args.quiet)
    try:
        result = run_job(spec, resume=args.resume, retry_errors=args.retry_errors, address=args.address,
                         on_event=progress)
    finally:
        progress.close()
    _print_stats(result.stats, result.out)
    return 0


def _progress(quiet: bool):
    from .progress import LogProgress, RichProgress

    if quiet or not sys.stdout.isatty():
        return LogProgress()
    return RichProgress(_console())


_CONSOLE = None


def _console():
    """One rich console for the live display and log lines, so logs print above the display."""
    global _CONSOLE
    if _CONSOLE is None:
        from rich.console import Console

        _CONSOLE = Console(stderr=False)
    return _CONSOLE


def _print_stats(stats: dict, out: Path) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"{out}", show_header=False)
    pct = lambda v: "-" if v is None else f"{100 * v:.2f}%"  # noqa: E731
    rows = [("precision / engine", f"{stats['precision']} / {stats['engine']}"),
            ("workers x threads", f"{stats['workers']} x {stats['threads_per_worker']}"),
            ("utterances (failed)", f"{stats['utterances']:,} ({stats['failed']:,})"),
            ("audio", f"{stats['audio_seconds'] / 3600:.2f} h"),
            ("startup / wall", f"{stats['startup_seconds']:.1f} s / {stats['wall_seconds']:.1f} s"),
            ("RTFx", "-" if stats["rtfx"] is None else f"{stats['rtfx']:,.1f}"),
            ("WER / CER", f"{pct(stats['wer'])} / {pct(stats['cer'])}")]
    for key, value in rows:
        table.add_row(key, value)
    Console(soft_wrap=True).print(table)


def _cmd_export(args) -> int:
    from .model import save_checkpoint
    from .nemo_loader import load_nemo

    spec, state_dict = load_nemo(args.model)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    save_checkpoint(spec, state_dict, args.out)
    print(f"wrote {args.out} ({len(spec.encoder.blocks)} encoder blocks, {len(spec.vocabulary)} labels)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
