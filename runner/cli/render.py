"""What the command line prints: run summaries, comparisons, quantization reports (rich tables).

Only the command line prints and owns `rich`; library code logs.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from runner.int8.report import QuantizationReport

_CONSOLE = None


def console():
    """One rich console for the live display and log lines, so logs print above the display."""
    global _CONSOLE
    if _CONSOLE is None:
        from rich.console import Console

        _CONSOLE = Console(stderr=False)
    return _CONSOLE


def print_stats(stats: dict, out: Path) -> None:
    from rich.table import Table

    table = Table(title=f"{out}", show_header=False)
    rows = [
        ("precision / engine", f"{stats['precision']} / {stats['engine']}"),
        ("workers x threads", f"{stats['workers']} x {stats['threads_per_worker']}"),
        ("utterances (failed)", f"{stats['utterances']:,} ({stats['failed']:,})"),
        ("audio", f"{stats['audio_seconds'] / 3600:.2f} h"),
        ("total (command start to _SUCCESS)", seconds(stats.get("total_seconds"))),
        ("RTFx end to end", times(stats.get("rtfx_total"))),
        (
            "quantize / startup / dispatch",
            f"{seconds(stats.get('quantize_seconds'))} / "
            f"{stats['startup_seconds']:.1f} s / {stats['wall_seconds']:.1f} s",
        ),
        ("RTFx of the dispatch", times(stats["rtfx"])),
        ("WER / CER", f"{pct(stats['wer'])} / {pct(stats['cer'])}"),
    ]
    if stats.get("int8_check"):
        rows.append(("int8 self-check (worst worker)", int8_check_line(stats["int8_check"])))
    split = stats.get("split")
    if split:
        rows.append(
            (
                "long lines split",
                f"{split['lines']} into {split['segments']} segments ({split['at_pause']} cut at pauses, "
                f"{split['forced']} forced)",
            )
        )
    fractions = sorted((stats.get("stage_fractions") or {}).items(), key=lambda kv: -kv[1])
    if fractions:
        rows.append(("time by stage", ", ".join(f"{k} {100 * v:.0f}%" for k, v in fractions)))
    for key, value in rows:
        table.add_row(key, value)
    table_console().print(table)


def int8_check_line(check: dict) -> str:
    """The worst worker's int8 self-check in one line (run summary, compare, demo)."""
    line = (
        f"{'passed' if check['passed'] else 'FAILED'}: {check['engine']} {check['activation_bits']}-bit, logit "
        f"cosine {check['logit_cosine']:.4f}, frames {pct(check['frame_agreement'])}, WER vs fp32 "
        f"{pct(check['wer_vs_fp32'])} ({check['worker']}, worst of {check['workers']})"
    )
    if check.get("fallbacks"):
        line += "; fallbacks: " + ", ".join(f"{n} to {what}" for what, n in check["fallbacks"].items())
    return line


def print_comparison(result: dict, title: str) -> None:
    """Two runs side by side (`compare`, `demo`): each run's figures, then A against B in the last column."""
    from rich.table import Table

    a, b, agree = result["a"], result["b"], result["agreement"]
    table = Table(title=title, caption=agree["note"])
    table.add_column("")
    for col in (a["label"], b["label"], f"{a['label']} vs {b['label']}"):
        table.add_column(col, justify="right")
    rows = [
        ("precision / engine", lambda r: f"{r['precision']} / {r['engine']}", ""),
        ("workers x threads", lambda r: f"{r['workers']} x {r['threads_per_worker']}", ""),
        ("utterances (failed)", lambda r: f"{r['utterances']:,} ({r['failed']:,})", ""),
        ("audio", lambda r: f"{r['audio_seconds'] / 60:,.1f} min", ""),
        ("total (command start to _SUCCESS)", lambda r: seconds(r.get("total_seconds")), ""),
        (
            "RTFx end to end",
            lambda r: times(r.get("rtfx_total")),
            "-" if result.get("speedup_total") is None else f"{result['speedup_total']:.2f}x end to end",
        ),
        (
            "quantize / startup / dispatch",
            lambda r: (
                f"{seconds(r.get('quantize_seconds'))} / {r['startup_seconds']:.1f} s / {r['wall_seconds']:.1f} s"
            ),
            "",
        ),
        (
            "RTFx of the dispatch",
            lambda r: "-" if r["rtfx"] is None else f"{r['rtfx']:,.0f}",
            "-" if result["speedup"] is None else f"{result['speedup']:.2f}x speedup",
        ),
        ("WER", lambda r: pct(r["wer"]), pct(result["wer_difference"], "+")),
        ("CER", lambda r: pct(r["cer"]), pct(result["cer_difference"], "+")),
        (
            "peak worker RSS max / mean",
            lambda r: (
                "-"
                if r["peak_rss_mb"] is None
                else f"{r['peak_rss_mb']['max']:,.0f} / {r['peak_rss_mb']['mean']:,.0f} MB"
            ),
            "",
        ),
    ]
    if a.get("int8_check") or b.get("int8_check"):
        rows.append(
            (
                "int8 self-check, worst worker",
                lambda r: (
                    "-"
                    if not r.get("int8_check")
                    else f"{r['int8_check']['activation_bits']}-bit, cosine {r['int8_check']['logit_cosine']:.4f}"
                    f"{'' if r['int8_check']['passed'] else ' FAILED'}"
                    f"{', fallbacks' if r['int8_check'].get('fallbacks') else ''}"
                ),
                "",
            )
        )
    for name, cell, versus in rows:
        table.add_row(name, cell(a), cell(b), versus)
    table.add_row("identical transcripts", "", "", f"{pct(agree['identical'])} of {agree['utterances']:,}")
    table.add_row(f"WER {a['label']} vs {b['label']} text", "", "", pct(agree["wer_a_vs_b"]))
    words = result.get("words")
    if words and words["matched_words"]:
        table.add_row(
            "word start / end, mean difference",
            "",
            "",
            f"{1000 * words['mean_abs_start_diff']:.1f} / {1000 * words['mean_abs_end_diff']:.1f} ms",
        )
        table.add_row(
            "words within one frame", "", "", f"{pct(words['within_one_frame'])} of {words['matched_words']:,}"
        )
        table.add_row("word confidence, mean difference", "", "", f"{words['mean_abs_confidence_diff']:.4f}")
    if a.get("confidence_check") or b.get("confidence_check"):
        table.add_row("words wrong: confidence < 0.5 / >= 0.5", confidence_cell(a), confidence_cell(b), "")
    table_console().print(table)


def confidence_cell(run: dict) -> str:
    check = run.get("confidence_check")
    if not check or not (check["low_words"] + check["high_words"]):
        return "-"
    return (
        f"{pct(check['wrong_below'])} of {check['low_words']:,} / {pct(check['wrong_at_or_above'])} of "
        f"{check['high_words']:,}"
    )


def table_console():
    """Tables on a terminal fit its width; piped or logged, they get 140 columns rather than rich's 80, so
    that a row stays one line (and greppable)."""
    from rich.console import Console

    return Console(soft_wrap=True, width=None if sys.stdout.isatty() else 140)


def seconds(value: float | None) -> str:
    return "-" if value is None else f"{value:,.1f} s"


def times(value: float | None) -> str:
    return "-" if value is None else f"{value:,.1f}"


def pct(value: float | None, sign: str = "") -> str:
    """A fraction as a percentage (`sign="+"` for differences); "-" when there is none."""
    return "-" if value is None else f"{100 * value:{sign}.2f}%"


def print_report(report: QuantizationReport) -> None:
    """The quantization report as tables: gate, observers, engines, fp32 fallback."""
    from rich.console import Console
    from rich.table import Table

    console = Console(soft_wrap=True)
    gate = report.gate
    t = Table(title="int8 accuracy gate", show_header=False)
    t.add_row(
        "held-out utterances",
        f"{gate.get('utterances')} ({gate.get('seconds', 0):.0f} s), "
        f"calibration on {report.calibration.get('utterances')} others",
    )
    if gate.get("chunks", 1) > 1:
        early = gate.get("chunks_read", 0) < gate["chunks"]
        stopped = "; stopped early: the decision was clear" if early else ""
        t.add_row(
            "gate read",
            f"{gate.get('chunks_read')} of {gate['chunks']} chunks of "
            f"{gate.get('planned_utterances')} utterances{stopped}",
        )
    if report.phase_seconds:
        t.add_row(
            "quantized in",
            f"{report.seconds or 0:.1f} s ("
            + ", ".join(f"{k} {v:.1f} s" for k, v in report.phase_seconds.items() if v)
            + ")",
        )
    t.add_row("measure", gate.get("mode", "-"))
    if gate.get("fp32"):
        t.add_row("WER fp32 / int8", f"{pct(gate['fp32'].get('wer'))} / {pct(gate.get('int8', {}).get('wer'))}")
        t.add_row("CER fp32 / int8", f"{pct(gate['fp32'].get('cer'))} / {pct(gate.get('int8', {}).get('cer'))}")
    int8 = gate.get("int8", {})
    t.add_row("int8 vs fp32 transcripts (WER)", pct(int8.get("wer_vs_fp32")))
    t.add_row(
        "logit cosine / frame agreement", f"{int8.get('logit_cosine', 0):.4f} / {pct(int8.get('frame_agreement'))}"
    )
    t.add_row("increase / limit", f"{pct(gate.get('increase'))} / {pct(gate.get('max_wer_increase'))}")
    t.add_row("kept in fp32", ", ".join(report.fp32_units) or "none")
    t.add_row("result", "[green]passed[/]" if gate.get("passed") else "[red]FAILED[/]")
    console.print(t)
    obs = Table(title=f"activation observers (chosen: {report.observer})")
    for col in ("observer", "WER vs fp32", "logit error", "WER"):
        obs.add_column(col)
    for name, fig in report.observers.items():
        obs.add_row(name, pct(fig["wer_vs_fp32"]), f"{fig['logit_error']:.5f}", pct(fig.get("wer")))
    console.print(obs)
    print_bits(console, report)
    probe = report.extra.get("engine_seconds_per_audio_second")  # reports of releases that probed on the driver
    if probe:
        eng = Table(title=f"engines on this CPU (gate ran on {report.engine})")
        eng.add_column("engine")
        eng.add_column("probe speed (x real time)")
        for name, sec in sorted(probe.items(), key=lambda kv: kv[1]):
            eng.add_row(name, f"{1 / sec:,.0f}x" if sec > 0 else "-")
        console.print(eng)
    if report.sensitivity:
        sens = Table(
            title="layer sensitivity (logit error with the layer kept in fp32; all-int8: "
            f"{report.sensitivity[0]['logit_error_all_int8']:.5f})"
        )
        sens.add_column("layer")
        sens.add_column("logit error")
        for row in report.sensitivity:
            sens.add_row(row["unit"], f"{row['logit_error_with_unit_in_fp32']:.5f}")
        console.print(sens)


def print_bits(console, report: QuantizationReport) -> None:
    """Which activation bits each kind of CPU will use, and what its workers' self-check expects."""
    from rich.table import Table

    from runner.int8.engines import BITS_BY_CPU_KIND
    from runner.int8.self_check import expected

    cpu = report.cpu
    t = Table(title="int8 on each kind of CPU (calibrated once; every worker checks itself before it transcribes)")
    t.add_column("CPU kind: engines")
    t.add_column("activations")
    t.add_column("self-check expects (cosine / frames)")
    reference = report.self_check
    for kind, bits in BITS_BY_CPU_KIND:
        fig = expected(reference, bits)
        expects = "-" if not fig else f"{fig['logit_cosine']:.4f} / {pct(fig['frame_agreement'])}"
        t.add_row(kind, f"{bits}-bit", expects)
    console.print(t)
    console.print(
        f"this CPU: {cpu.get('model', '?')} ({' '.join(cpu.get('flags', [])) or 'no SIMD flags read'}); "
        f"the gate ran {report.activation_bits}-bit activations on {report.engine}"
    )
    if report.depthwise_convs:
        console.print(
            "depthwise convs: our AVX2 kernel on x86 CPUs without VNNI (2.6-4.6x oneDNN's there), the engine's "
            f"elsewhere; the gate ran {report.depthwise_convs}"
        )
    if report.attention_matmuls:
        console.print(
            "attention matmuls (Conformer layers in int8): bf16 on CPUs with avx512_bf16 or amx_bf16, fp32 "
            f"elsewhere; the gate ran {report.attention_matmuls}"
        )
