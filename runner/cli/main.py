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

from runner import __version__
from runner.errors import AudioLoadError, RunnerError

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

    p = sub.add_parser("demo", parents=[common],
                       help="the bundled model and audio: int8 job, fp32 baseline job, comparison (offline)")
    p.add_argument("--out", help="folder for the two runs (default: runs/demo-DATE-TIME)")
    p.set_defaults(func=_cmd_demo)

    p = sub.add_parser("compare", parents=[common],
                       help="two finished runs side by side: speed, accuracy, transcript agreement, worker memory")
    p.add_argument("run_a", metavar="RUN_A", help="a run folder (the --out of `asr-runner run`), e.g. the int8 run")
    p.add_argument("run_b", metavar="RUN_B", help="the run to compare it with, e.g. the fp32 baseline; "
                   "speedup = RTFx A / RTFx B, differences = A - B")
    p.add_argument("--out", metavar="DIR", default=".",
                   help="folder for compare-A-vs-B.json (the figures) and compare-A-vs-B.png (the chart), "
                        "A and B being the run folders' names (with their parents' when the two are the same; "
                        "default DIR: the current directory)")
    p.set_defaults(func=_cmd_compare)

    p = sub.add_parser("quantize", parents=[common],
                       help="calibrate int8 on a manifest, check its accuracy, write the artifact and its report")
    p.add_argument("model", help=".nemo file (or lean checkpoint)")
    p.add_argument("--calibration", required=True, metavar="MANIFEST",
                   help="NeMo manifest to sample calibration and held-out gate utterances from (disjoint samples)")
    p.add_argument("--out", required=True, metavar="ARTIFACT", help="artifact file to write")
    p.add_argument("--engine", default="auto", choices=["auto", "onednn", "x86", "fbgemm", "qnnpack"],
                   help="engine the accuracy gate runs on (auto: onednn where it exists); workers choose their own")
    p.add_argument("--items", type=int, default=100, help="calibration utterances (default 100)")
    p.add_argument("--gate-items", type=int, default=100, help="held-out utterances for the accuracy gate")
    p.add_argument("--max-wer-increase", type=float, default=0.005,
                   help="accuracy gate, a fraction (default 0.005 = 0.5 WER points)")
    p.add_argument("--max-fp32-layers", type=int, default=3,
                   help="layers the gate may keep in fp32 before it fails (default 3)")
    p.set_defaults(func=_cmd_quantize)

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
    from runner.model.nemo_loader import quiet_nemo_logging

    quiet_nemo_logging(verbose)


def _cmd_transcribe(args) -> int:
    import torch

    from runner.inputs.audio import load_audio
    from runner.model.nemo_loader import load_any
    from runner.model.transcribe import DecodeOptions, transcribe_batch

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
    from runner.job.run import run_job
    from runner.job.spec import load_spec

    out = str(Path(args.out).resolve()) if args.out else None
    spec = load_spec(args.spec, output=out, workers=args.workers, precision=args.precision)
    progress = _progress(args.quiet)
    try:
        result = run_job(spec, resume=args.resume, retry_errors=args.retry_errors, address=args.address,
                         on_event=progress, started=_process_started())
    finally:
        progress.close()
    _print_stats(result.stats, result.out)
    return 0


def _process_started() -> float:
    """When this command started (epoch seconds): the user's clock includes Python's own start-up."""
    import psutil

    return psutil.Process().create_time()


def _progress(quiet: bool):
    from runner.cli.progress import LogProgress, RichProgress

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
    from rich.table import Table

    table = Table(title=f"{out}", show_header=False)
    rows = [("precision / engine", f"{stats['precision']} / {stats['engine']}"),
            ("workers x threads", f"{stats['workers']} x {stats['threads_per_worker']}"),
            ("utterances (failed)", f"{stats['utterances']:,} ({stats['failed']:,})"),
            ("audio", f"{stats['audio_seconds'] / 3600:.2f} h"),
            ("total (command start to _SUCCESS)", _seconds(stats.get("total_seconds"))),
            ("RTFx end to end", _times(stats.get("rtfx_total"))),
            ("quantize / startup / dispatch", f"{_seconds(stats.get('quantize_seconds'))} / "
                                              f"{stats['startup_seconds']:.1f} s / {stats['wall_seconds']:.1f} s"),
            ("RTFx of the dispatch", _times(stats["rtfx"])),
            ("WER / CER", f"{_pct(stats['wer'])} / {_pct(stats['cer'])}")]
    if stats.get("int8_check"):
        rows.append(("int8 self-check (worst worker)", int8_check_line(stats["int8_check"])))
    fractions = sorted((stats.get("stage_fractions") or {}).items(), key=lambda kv: -kv[1])
    if fractions:
        rows.append(("time by stage", ", ".join(f"{k} {100 * v:.0f}%" for k, v in fractions)))
    for key, value in rows:
        table.add_row(key, value)
    _table_console().print(table)


def int8_check_line(check: dict) -> str:
    """The worst worker's int8 self-check in one line (run summary, compare, demo)."""
    line = (f"{'passed' if check['passed'] else 'FAILED'}: {check['engine']} {check['activation_bits']}-bit, logit "
            f"cosine {check['logit_cosine']:.4f}, frames {_pct(check['frame_agreement'])}, WER vs fp32 "
            f"{_pct(check['wer_vs_fp32'])} ({check['worker']}, worst of {check['workers']})")
    if check.get("fallbacks"):
        line += "; fallbacks: " + ", ".join(f"{n} to {what}" for what, n in check["fallbacks"].items())
    return line


def _cmd_demo(args) -> int:
    from runner.cli.demo import run_demo

    result = run_demo(Path(args.out) if args.out else None, progress=lambda: _progress(args.quiet))
    i8, f32 = result["a"], result["b"]
    _print_comparison(result, f"demo: the bundled model on {i8['utterances']} held-out utterances")
    print(f"runs: {i8['path']} and {f32['path']} "
          f"(int8 artifact {'from the cache' if (i8['quantization'] or {}).get('from_cache') else 'made now'}); "
          f"comparison.json and comparison.png in {Path(i8['path']).parent}")
    return 0


def _cmd_compare(args) -> int:
    from runner.cli import compare

    result = compare.compare_runs(Path(args.run_a), Path(args.run_b))
    figures, chart = compare.write(result, Path(args.out), compare.file_stem(result))
    _print_comparison(result, f"A = {result['a']['path']}\nB = {result['b']['path']}")
    print(f"wrote {figures} and {chart}")
    return 0


def _print_comparison(result: dict, title: str) -> None:
    """Two runs side by side (`compare`, `demo`): each run's figures, then A against B in the last column."""
    from rich.table import Table

    a, b, agree = result["a"], result["b"], result["agreement"]
    table = Table(title=title, caption=agree["note"])
    table.add_column("")
    for col in (a["label"], b["label"], f"{a['label']} vs {b['label']}"):
        table.add_column(col, justify="right")
    rows = [("precision / engine", lambda r: f"{r['precision']} / {r['engine']}", ""),
            ("workers x threads", lambda r: f"{r['workers']} x {r['threads_per_worker']}", ""),
            ("utterances (failed)", lambda r: f"{r['utterances']:,} ({r['failed']:,})", ""),
            ("audio", lambda r: f"{r['audio_seconds'] / 60:,.1f} min", ""),
            ("total (command start to _SUCCESS)", lambda r: _seconds(r.get("total_seconds")), ""),
            ("RTFx end to end", lambda r: _times(r.get("rtfx_total")),
             "-" if result.get("speedup_total") is None else f"{result['speedup_total']:.2f}x end to end"),
            ("quantize / startup / dispatch", lambda r: f"{_seconds(r.get('quantize_seconds'))} / "
             f"{r['startup_seconds']:.1f} s / {r['wall_seconds']:.1f} s", ""),
            ("RTFx of the dispatch", lambda r: "-" if r["rtfx"] is None else f"{r['rtfx']:,.0f}",
             "-" if result["speedup"] is None else f"{result['speedup']:.2f}x speedup"),
            ("WER", lambda r: _pct(r["wer"]), _pct(result["wer_difference"], "+")),
            ("CER", lambda r: _pct(r["cer"]), _pct(result["cer_difference"], "+")),
            ("peak worker RSS max / mean", lambda r: "-" if r["peak_rss_mb"] is None else
             f"{r['peak_rss_mb']['max']:,.0f} / {r['peak_rss_mb']['mean']:,.0f} MB", "")]
    if a.get("int8_check") or b.get("int8_check"):
        rows.append(("int8 self-check, worst worker", lambda r: "-" if not r.get("int8_check") else
                     f"{r['int8_check']['activation_bits']}-bit, cosine {r['int8_check']['logit_cosine']:.4f}"
                     f"{'' if r['int8_check']['passed'] else ' FAILED'}"
                     f"{', fallbacks' if r['int8_check'].get('fallbacks') else ''}", ""))
    for name, cell, versus in rows:
        table.add_row(name, cell(a), cell(b), versus)
    table.add_row("identical transcripts", "", "", f"{_pct(agree['identical'])} of {agree['utterances']:,}")
    table.add_row(f"WER {a['label']} vs {b['label']} text", "", "", _pct(agree["wer_a_vs_b"]))
    _table_console().print(table)


def _table_console():
    """Tables on a terminal fit its width; piped or logged, they get 140 columns rather than rich's 80, so
    that a row stays one line (and greppable)."""
    from rich.console import Console

    return Console(soft_wrap=True, width=None if sys.stdout.isatty() else 140)


def _seconds(value: Optional[float]) -> str:
    return "-" if value is None else f"{value:,.1f} s"


def _times(value: Optional[float]) -> str:
    return "-" if value is None else f"{value:,.1f}"


def _pct(value: Optional[float], sign: str = "") -> str:
    """A fraction as a percentage (`sign="+"` for differences); "-" when there is none."""
    return "-" if value is None else f"{100 * value:{sign}.2f}%"


def _cmd_quantize(args) -> int:
    from runner.int8 import artifact
    from runner.int8.pipeline import GateFailed, Settings, make_artifact
    from runner.errors import InputError
    from runner.model.nemo_loader import check_model_file

    check_model_file(args.model)
    checks = [(args.items >= 1, "--items must be >= 1"), (args.gate_items >= 1, "--gate-items must be >= 1"),
              (0 <= args.max_wer_increase < 1, "--max-wer-increase is a fraction in [0, 1) (0.005 = 0.5 points)"),
              (args.max_fp32_layers >= 0, "--max-fp32-layers must be >= 0")]
    for ok, message in checks:
        if not ok:
            raise InputError(message)
    settings = Settings(calibration_items=args.items, gate_items=args.gate_items,
                        max_wer_increase=args.max_wer_increase, max_fp32_layers=args.max_fp32_layers,
                        engine=args.engine)
    try:
        data, _ = make_artifact(args.model, args.calibration, None, settings, use_cache=False)
    except GateFailed as exc:
        _print_report(exc.report)
        raise
    artifact.save(data, args.out)
    _print_report(artifact.Artifact.from_bytes(data).report)
    print(f"wrote {args.out} ({len(data) / 1e6:.2f} MB, sha256 {artifact.sha256(data)[:16]})")
    return 0


def _print_report(report: dict) -> None:
    """The quantization report as tables: gate, observers, engines, fp32 fallback."""
    from rich.console import Console
    from rich.table import Table

    console = Console(soft_wrap=True)
    gate = report.get("gate", {})
    t = Table(title="int8 accuracy gate", show_header=False)
    t.add_row("held-out utterances", f"{gate.get('utterances')} ({gate.get('seconds', 0):.0f} s), "
              f"calibration on {report.get('calibration', {}).get('utterances')} others")
    if gate.get("chunks", 1) > 1:
        early = gate.get("chunks_read", 0) < gate["chunks"]
        stopped = "; stopped early: the decision was clear" if early else ""
        t.add_row("gate read", f"{gate.get('chunks_read')} of {gate['chunks']} chunks of "
                  f"{gate.get('planned_utterances')} utterances{stopped}")
    if report.get("phase_seconds"):
        t.add_row("quantized in", f"{report.get('seconds', 0):.1f} s (" + ", ".join(
            f"{k} {v:.1f} s" for k, v in report["phase_seconds"].items() if v) + ")")
    t.add_row("measure", gate.get("mode", "-"))
    if gate.get("fp32"):
        t.add_row("WER fp32 / int8", f"{_pct(gate['fp32'].get('wer'))} / {_pct(gate.get('int8', {}).get('wer'))}")
        t.add_row("CER fp32 / int8", f"{_pct(gate['fp32'].get('cer'))} / {_pct(gate.get('int8', {}).get('cer'))}")
    int8 = gate.get("int8", {})
    t.add_row("int8 vs fp32 transcripts (WER)", _pct(int8.get("wer_vs_fp32")))
    t.add_row("logit cosine / frame agreement", f"{int8.get('logit_cosine', 0):.4f} / {_pct(int8.get('frame_agreement'))}")
    t.add_row("increase / limit", f"{_pct(gate.get('increase'))} / {_pct(gate.get('max_wer_increase'))}")
    t.add_row("kept in fp32", ", ".join(report.get("fp32_units", [])) or "none")
    t.add_row("result", "[green]passed[/]" if gate.get("passed") else "[red]FAILED[/]")
    console.print(t)
    obs = Table(title=f"activation observers (chosen: {report.get('observer')})")
    for col in ("observer", "WER vs fp32", "logit error", "WER"):
        obs.add_column(col)
    for name, fig in report.get("observers", {}).items():
        obs.add_row(name, _pct(fig["wer_vs_fp32"]), f"{fig['logit_error']:.5f}", _pct(fig.get("wer")))
    console.print(obs)
    _print_bits(console, report)
    if report.get("engine_seconds_per_audio_second"):
        eng = Table(title=f"engines on this CPU (gate ran on {report.get('engine')})")
        eng.add_column("engine")
        eng.add_column("probe speed (x real time)")
        for name, sec in sorted(report["engine_seconds_per_audio_second"].items(), key=lambda kv: kv[1]):
            eng.add_row(name, f"{1 / sec:,.0f}x" if sec > 0 else "-")
        console.print(eng)
    if report.get("sensitivity"):
        sens = Table(title="layer sensitivity (logit error with the layer kept in fp32; all-int8: "
                           f"{report['sensitivity'][0]['logit_error_all_int8']:.5f})")
        sens.add_column("layer")
        sens.add_column("logit error")
        for row in report["sensitivity"]:
            sens.add_row(row["unit"], f"{row['logit_error_with_unit_in_fp32']:.5f}")
        console.print(sens)


def _print_bits(console, report: dict) -> None:
    """Which activation bits each kind of CPU will use, and what its workers' self-check expects."""
    from rich.table import Table

    from runner.int8.self_check import expected
    from runner.int8.engines import BITS_BY_CPU_KIND

    cpu = report.get("cpu", {})
    t = Table(title="int8 on each kind of CPU (calibrated once; every worker checks itself before it transcribes)")
    t.add_column("CPU kind: engines")
    t.add_column("activations")
    t.add_column("self-check expects (cosine / frames)")
    reference = report.get("self_check") or {}
    for kind, bits in BITS_BY_CPU_KIND:
        fig = expected(reference, bits)
        expects = "-" if not fig else f"{fig['logit_cosine']:.4f} / {_pct(fig['frame_agreement'])}"
        t.add_row(kind, f"{bits}-bit", expects)
    console.print(t)
    console.print(f"this CPU: {cpu.get('model', '?')} ({' '.join(cpu.get('flags', [])) or 'no SIMD flags read'}); "
                  f"the gate ran {report.get('activation_bits')}-bit activations on {report.get('engine')}")


def _cmd_export(args) -> int:
    from runner.model.ctc import save_checkpoint
    from runner.model.nemo_loader import load_nemo

    spec, state_dict = load_nemo(args.model)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    save_checkpoint(spec, state_dict, args.out)
    size = (f"{len(spec.encoder.blocks)} encoder blocks" if spec.family == "conv-ctc"
            else f"{spec.encoder.n_layers} Conformer layers")
    print(f"wrote {args.out} ({size}, {len(spec.vocabulary)} labels)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
