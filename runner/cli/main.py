"""`asr-runner`: the command line. Thin: parse, call one library function, render the result.

Only the command line (this module and `runner.cli.render`) prints and owns `rich`; library code logs.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from runner import __version__
from runner.cli import render
from runner.errors import AudioLoadError, RunnerError
from runner.int8.config import ENGINE_CHOICES

log = logging.getLogger("runner")


DECODER_HELP = "a hybrid RNN-T/CTC model's head (default: the model's own, rnnt), as the job spec's `decoder`"


def main(argv: Sequence[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    restore = _setup_logging(args.verbose, args.quiet)
    try:
        return args.func(args)
    except RunnerError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    finally:
        restore()


def console() -> None:
    """The `asr-runner` command: `main`, then a quick exit (in-process callers use `main`).

    When a command returns, its outputs are written (atomically, fsynced) and Ray is shut down. What is
    left is the interpreter's teardown of torch's operator registry, Ray's client and the imported
    modules: 0.79-0.89 s after the demo job's `main` returned on 2 cores, against 0.03-0.04 s with
    `os._exit`. So the command flushes its log handlers and streams and leaves with `os._exit`. An
    exception out of `main` (a bug) ends the process the usual way, with its traceback."""
    import os

    code = main()
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0 if code is None else int(code))  # as sys.exit(main()) would


def _parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    # SUPPRESS: a flag given before or after the subcommand both count (argparse would
    # otherwise let the subcommand's default overwrite the top-level value).
    common.add_argument(
        "--quiet", action="store_true", default=argparse.SUPPRESS, help="log lines only, no live display"
    )
    common.add_argument("--verbose", action="store_true", default=argparse.SUPPRESS, help="debug logging")
    parser = argparse.ArgumentParser(
        prog="asr-runner", parents=[common], description="int8 batch transcription of NeMo CTC models on CPU"
    )
    parser.set_defaults(quiet=False, verbose=False)
    parser.add_argument("--version", action="version", version=f"asr-runner {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("transcribe", parents=[common], help="transcribe audio files with the lean fp32 model")
    p.add_argument("model", help=".nemo file or lean checkpoint (from `asr-runner export`)")
    p.add_argument("audio", nargs="+", help="audio files (anything libsndfile reads)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--window-seconds", type=float, default=40.0, help="longer files go in windows of this size")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    p.add_argument(
        "--words",
        action="store_true",
        help="one JSON line per file: path, text, words with start/end seconds and confidence (NeMo's defaults)",
    )
    p.add_argument("--decoder", choices=["rnnt", "ctc"], help=DECODER_HELP)
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

    p = sub.add_parser(
        "demo", parents=[common], help="the bundled model and audio: int8 job, fp32 baseline job, comparison (offline)"
    )
    p.add_argument("--out", help="folder for the two runs (default: runs/demo-DATE-TIME)")
    p.set_defaults(func=_cmd_demo)

    p = sub.add_parser(
        "compare",
        parents=[common],
        help="two finished runs side by side: speed, accuracy, transcript agreement, worker memory",
    )
    p.add_argument("run_a", metavar="RUN_A", help="a run folder (the --out of `asr-runner run`), e.g. the int8 run")
    p.add_argument(
        "run_b",
        metavar="RUN_B",
        help="the run to compare it with, e.g. the fp32 baseline; speedup = RTFx A / RTFx B, differences = A - B",
    )
    p.add_argument(
        "--out",
        metavar="DIR",
        default=".",
        help="folder for compare-A-vs-B.json (the figures) and compare-A-vs-B.png (the chart), "
        "A and B being the run folders' names (with their parents' when the two are the same; "
        "default DIR: the current directory)",
    )
    p.set_defaults(func=_cmd_compare)

    p = sub.add_parser(
        "convert",
        parents=[common],
        help="a finished run as subtitles (SRT, WebVTT: one file per audio file), NIST CTM or a NeMo manifest",
    )
    p.add_argument("run", metavar="RUN", help="a run folder (the --out of `asr-runner run`)")
    p.add_argument(
        "--to",
        required=True,
        metavar="FORMAT",
        help="srt, vtt: one subtitle file per audio file; ctm: one line per word (NIST); "
        "manifest: NeMo JSONL with pred_text and word timestamps (srt, vtt and ctm need a run with timestamps: true)",
    )
    p.add_argument("--out", required=True, metavar="DIR", help="folder for the files (created)")
    p.set_defaults(func=_cmd_convert)

    p = sub.add_parser(
        "quantize",
        parents=[common],
        help="calibrate int8 on a manifest, check its accuracy, write the artifact and its report",
    )
    p.add_argument("model", help=".nemo file (or lean checkpoint)")
    p.add_argument(
        "--calibration",
        required=True,
        metavar="MANIFEST",
        help="NeMo manifest to sample calibration and held-out gate utterances from (disjoint samples)",
    )
    p.add_argument("--out", required=True, metavar="ARTIFACT", help="artifact file to write")
    p.add_argument(
        "--engine",
        default="auto",
        choices=ENGINE_CHOICES,
        help="engine the accuracy gate runs on (auto: onednn where it exists); workers choose their own",
    )
    p.add_argument("--items", type=int, default=100, help="calibration utterances (default 100)")
    p.add_argument("--gate-items", type=int, default=100, help="held-out utterances for the accuracy gate")
    p.add_argument(
        "--max-wer-increase",
        type=float,
        default=0.005,
        help="accuracy gate, a fraction (default 0.005 = 0.5 WER points)",
    )
    p.add_argument(
        "--max-fp32-layers", type=int, default=3, help="layers the gate may keep in fp32 before it fails (default 3)"
    )
    p.add_argument("--decoder", choices=["rnnt", "ctc"], help=DECODER_HELP)
    p.set_defaults(func=_cmd_quantize)

    p = sub.add_parser(
        "export", parents=[common], help="write a .nemo model as a lean checkpoint (no NeMo needed to load)"
    )
    p.add_argument("model", help=".nemo file")
    p.add_argument("--out", required=True, help="output file")
    p.set_defaults(func=_cmd_export)
    return parser


def _setup_logging(verbose: bool, quiet: bool) -> Callable[[], None]:
    """Log lines on stderr; on a terminal (and not --quiet) through rich, above the live display.

    Returns what puts the loggers back as they were: an in-process caller of `main` (a notebook, a test)
    keeps no handler bound to a stream it may close, and its own levels."""
    level = logging.DEBUG if verbose else logging.INFO
    if quiet or not sys.stdout.isatty():
        handler: logging.Handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    else:
        from rich.logging import RichHandler

        handler = RichHandler(console=render.console(), show_path=False, markup=False)
    root, ours = logging.getLogger(), logging.getLogger("runner")
    handlers, root_level, our_level = root.handlers[:], root.level, ours.level
    root.handlers[:] = [*handlers, handler]
    root.setLevel(logging.WARNING)
    ours.setLevel(level)
    from runner.model.nemo_loader import quiet_nemo_logging

    quiet_nemo_logging(verbose)

    def restore() -> None:
        handler.flush()
        root.handlers[:] = handlers
        root.setLevel(root_level)
        ours.setLevel(our_level)

    return restore


def _cmd_transcribe(args) -> int:
    import json

    import torch

    from runner.inputs.audio import load_audio
    from runner.model.nemo_loader import load_any
    from runner.model.transcribe import DecodeOptions, transcribe, word_aligner

    if args.threads:
        torch.set_num_threads(args.threads)
    model = load_any(args.model, args.decoder)
    rate = model.spec.features.sample_rate
    options = DecodeOptions(batch_size=args.batch_size, window_seconds=args.window_seconds)
    aligner = word_aligner(model) if args.words else None
    failed = 0
    for path in args.audio:
        try:
            audio = load_audio(path, rate)
        except AudioLoadError as exc:
            print(f"{path}\tERROR\t{exc}", file=sys.stderr)
            failed += 1
            continue
        start = time.perf_counter()
        result = transcribe(model, [audio], options, aligner=aligner)[0]
        log.info("%s: %.1f s audio in %.2f s", path, len(audio) / rate, time.perf_counter() - start)
        if aligner is None:
            print(f"{path}\t{result.text}")
        else:
            line = {"audio_filepath": path, "text": result.text, "words": result.words, "confidence": result.confidence}
            print(json.dumps(line, ensure_ascii=False))
    return 1 if failed else 0


def _cmd_run(args) -> int:
    from runner.job.run import run_job
    from runner.job.spec import load_spec

    out = str(Path(args.out).resolve()) if args.out else None
    spec = load_spec(args.spec, output=out, workers=args.workers, precision=args.precision)
    progress = _progress(args.quiet)
    try:
        result = run_job(
            spec,
            resume=args.resume,
            retry_errors=args.retry_errors,
            address=args.address,
            on_event=progress,
            started=_process_started(),
        )
    finally:
        progress.close()
    render.print_stats(result.stats, result.out)
    return 0


def _process_started() -> float:
    """When this command started (epoch seconds): the user's clock includes Python's own start-up."""
    import psutil

    return psutil.Process().create_time()


def _progress(quiet: bool):
    from runner.cli.progress import LogProgress, RichProgress

    if quiet or not sys.stdout.isatty():
        return LogProgress()
    return RichProgress(render.console())


def _cmd_demo(args) -> int:
    from runner.cli.demo import run_demo

    result = run_demo(Path(args.out) if args.out else None, progress=lambda: _progress(args.quiet))
    i8, f32 = result["a"], result["b"]
    render.print_comparison(result, f"demo: the bundled model on {i8['utterances']} held-out utterances")
    print(
        f"runs: {i8['path']} and {f32['path']} "
        f"(int8 artifact {'from the cache' if (i8['quantization'] or {}).get('from_cache') else 'made now'}); "
        f"comparison.json and comparison.png in {Path(i8['path']).parent}"
    )
    return 0


def _cmd_compare(args) -> int:
    from runner.cli import compare

    result = compare.compare_runs(Path(args.run_a), Path(args.run_b))
    figures, chart = compare.write(result, Path(args.out), compare.file_stem(result))
    render.print_comparison(result, f"A = {result['a']['path']}\nB = {result['b']['path']}")
    print(f"wrote {figures} and {chart}")
    return 0


def _cmd_convert(args) -> int:
    from runner.cli import convert

    result = convert.convert(Path(args.run), args.to, Path(args.out))
    if result.warning:
        print(f"warning: {result.warning}", file=sys.stderr)
    for line in convert.skipped_lines(result):
        print(line, file=sys.stderr)
    print(convert.summary(result))
    return 0


def _cmd_quantize(args) -> int:
    from runner.errors import InputError
    from runner.int8 import artifact
    from runner.int8.config import Settings
    from runner.int8.make import make_artifact
    from runner.int8.pipeline import GateFailed
    from runner.model.nemo_loader import check_model_file

    check_model_file(args.model)
    settings = Settings(
        calibration_items=args.items,
        gate_items=args.gate_items,
        max_wer_increase=args.max_wer_increase,
        max_fp32_layers=args.max_fp32_layers,
        engine=args.engine,
    )
    flags = {
        "calibration_items": "--items",
        "gate_items": "--gate-items",
        "max_wer_increase": "--max-wer-increase",
        "max_fp32_layers": "--max-fp32-layers",
        "engine": "--engine",
    }
    if problems := settings.problems(flags):
        raise InputError("; ".join(problems))
    try:
        made = make_artifact(args.model, args.calibration, None, settings, use_cache=False, decoder=args.decoder)
    except GateFailed as exc:
        render.print_report(exc.report)
        raise
    artifact.save(made.data, args.out)
    render.print_report(made.report)
    print(f"wrote {args.out} ({len(made.data) / 1e6:.2f} MB, sha256 {made.sha256[:16]})")
    return 0


def _cmd_export(args) -> int:
    from runner.model.ctc import save_checkpoint
    from runner.model.nemo_loader import load_nemo

    spec, state_dict = load_nemo(args.model)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    save_checkpoint(spec, state_dict, args.out)
    size = (
        f"{len(spec.encoder.blocks)} encoder blocks"
        if spec.family == "conv-ctc"
        else f"{spec.encoder.n_layers} Conformer layers"
    )
    print(f"wrote {args.out} ({size}, {len(spec.vocabulary)} labels)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
