"""`asr-runner compare`: two finished runs side by side: speed, accuracy, transcript agreement, worker memory.

Everything comes from the run folders (`job.json`, `stats.json`, the Parquet parts), so any two
runs can be compared after the fact: int8 against its fp32 baseline, two engines, two clusters.
Differences and ratios are A against B (speedup = RTFx A / RTFx B, WER difference = A - B).
"""

from __future__ import annotations

import io
import json
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc

from runner.errors import InputError
from runner.job.run_folder import JOB_FILE, STATS_FILE, SUCCESS_FILE, read_rows, write_atomic, write_json
from runner.metrics import confidence_usefulness, normalize_text, wer, word_timing_figures

RUN_KEYS = (
    "precision",
    "engine",
    "workers",
    "threads_per_worker",
    "utterances",
    "failed",
    "audio_seconds",
    "total_seconds",
    "rtfx_total",
    "quantize_seconds",  # None for runs made before they were recorded
    "rtfx",
    "wall_seconds",
    "startup_seconds",
    "wer",
    "cer",
    "scored_utterances",
    "cpu",
    "int8_check",
)


def compare_runs(a: Path, b: Path) -> dict:
    """The comparison of run folders A and B; raises `InputError` (exit 2) if either is not a finished run."""
    a, b = Path(a).resolve(), Path(b).resolve()
    label_a, label_b = _labels(a, b)
    (run_a, words_a), (run_b, words_b) = _run_summary(a, label_a), _run_summary(b, label_b)
    return {
        "a": run_a,
        "b": run_b,
        # end to end, the user's clock: for the same audio, how many times sooner A's command finished
        "speedup_total": round(run_a["rtfx_total"] / run_b["rtfx_total"], 2)
        if run_a["rtfx_total"] and run_b["rtfx_total"]
        else None,
        "speedup": round(run_a["rtfx"] / run_b["rtfx"], 2) if run_a["rtfx"] and run_b["rtfx"] else None,
        "wer_difference": _difference(run_a["wer"], run_b["wer"]),
        "cer_difference": _difference(run_a["cer"], run_b["cer"]),
        "agreement": agreement(a, b, same_manifest=run_a["manifest_sha256"] == run_b["manifest_sha256"]),
        "words": word_agreement(words_a, words_b, run_a["frame_seconds"] or run_b["frame_seconds"])
        if words_a and words_b
        else None,
    }


def _run_summary(out: Path, label: str) -> tuple[dict, dict[str, tuple] | None]:
    """The run's figures, and its words by id (`_ok_words`: the `words` column, read once)."""
    job, stats = _read_finished_run(out)
    words = _ok_words(out)
    workers = list((stats.get("worker_info") or {}).values())
    rss = [w["peak_rss_mb"] for w in workers if w.get("peak_rss_mb")]
    return {
        "label": label,
        "path": str(out),
        **{k: stats.get(k) for k in RUN_KEYS},
        "manifest_sha256": job.get("fingerprint", {}).get("manifest_sha256"),
        "quantization": {k: v for k, v in (stats.get("quantization") or {}).items() if k != "gate"} or None,
        # None for runs made before workers reported their memory
        "peak_rss_mb": {"max": max(rss), "mean": round(sum(rss) / len(rss), 1), "workers": len(rss)} if rss else None,
        "frame_seconds": next((w["frame_seconds"] for w in workers if w.get("frame_seconds")), None),
        "confidence_check": _confidence_check(words),  # None: the run has no words (timestamps: false)
    }, words


def _ok_words(out: Path) -> dict[str, tuple[str | None, list[dict]]] | None:
    """id -> (reference, words) of the run's ok rows; None when the run has no words (timestamps: false).
    Read as Python rows: Arrow's join takes no list columns."""
    rows = read_rows(out, ["id", "status", "reference", "words"]).to_pylist()
    words = {r["id"]: (r["reference"], r["words"]) for r in rows if r["status"] == "ok" and r["words"] is not None}
    return words or None


def _confidence_check(words: dict[str, tuple] | None) -> dict | None:
    """How often the run's low-confidence words are wrong against the references (rows with one)."""
    if words is None:
        return None
    usefulness = confidence_usefulness([(ref, w) for ref, w in words.values() if ref is not None])
    return {k: _round(v) for k, v in usefulness.items()}


def word_agreement(words_a: dict[str, tuple], words_b: dict[str, tuple], frame_seconds: float | None) -> dict:
    """How far B's word times and confidence are from A's, over the ids ok in both with words."""
    pairs = [(w, words_b[i][1]) for i, (_, w) in words_a.items() if i in words_b]
    figures = word_timing_figures(pairs, frame_seconds or 0.0)
    if frame_seconds is None:
        figures["within_one_frame"] = None
    return {**{k: _round(v) for k, v in figures.items()}, "frame_seconds": frame_seconds}


def _round(value):
    return round(value, 5) if isinstance(value, float) else value


def _read_finished_run(out: Path) -> tuple[dict, dict]:
    """`job.json` and `stats.json` of a run folder that `asr-runner run` finished (it wrote `_SUCCESS`)."""
    if not (out / JOB_FILE).is_file():
        raise InputError(
            f"{out}: not a run folder (no {JOB_FILE}); give the --out folder of an "
            "`asr-runner run` or `asr-runner demo` (e.g. runs/demo-DATE-TIME/int8)"
        )
    if not (out / SUCCESS_FILE).is_file() or not (out / STATS_FILE).is_file():
        raise InputError(
            f"{out}: the run has not finished (no {SUCCESS_FILE} or {STATS_FILE}); "
            f"complete it with `asr-runner run JOB.yaml --out {out} --resume`"
        )
    try:
        return json.loads((out / JOB_FILE).read_text()), json.loads((out / STATS_FILE).read_text())
    except json.JSONDecodeError as exc:
        raise InputError(
            f"{out}: {JOB_FILE} or {STATS_FILE} is not valid JSON ({exc}); re-run the job into a new --out"
        ) from None


def _labels(a: Path, b: Path) -> tuple[str, str]:
    """Column names: the folder names, with their parents when the names are the same."""
    if a.name != b.name:
        return a.name, b.name
    return f"{a.parent.name}/{a.name}", f"{b.parent.name}/{b.name}"


def _difference(x: float | None, y: float | None) -> float | None:
    return None if x is None or y is None else round(x - y, 5)


def agreement(a: Path, b: Path, same_manifest: bool = True) -> dict:
    """How far B's transcripts agree with A's, joined on `id` over rows that are `ok` in both.

    Over different manifests an id may name other audio: such pairs are left out and counted."""
    joined = _ok_rows(a).join(_ok_rows(b), keys="id", join_type="inner", right_suffix="_b")
    texts_a, texts_b, other_audio = [], [], 0
    for row in joined.to_pylist():
        if not same_manifest and (row["audio_filepath"], row["offset"]) != (row["audio_filepath_b"], row["offset_b"]):
            other_audio += 1
            continue
        texts_a.append(normalize_text(row["text"] or ""))
        texts_b.append(normalize_text(row["text_b"] or ""))
    identical = sum(x == y for x, y in zip(texts_a, texts_b))
    return {
        "utterances": len(texts_a),
        "identical": round(identical / len(texts_a), 5) if texts_a else None,
        "wer_a_vs_b": round(wer(texts_b, texts_a), 5) if texts_a else None,  # B's text as the reference
        "same_manifest": same_manifest,
        "other_audio": other_audio,
        "note": None
        if same_manifest
        else (
            f"the runs are over different manifests: agreement covers the "
            f"{len(texts_a)} ids ok in both that name the same audio"
        ),
    }


def _ok_rows(out: Path) -> pa.Table:
    table = read_rows(out, ["id", "audio_filepath", "offset", "status", "text"])
    return table.filter(pc.equal(table["status"], "ok")).drop_columns(["status"])


def file_stem(result: dict) -> str:
    """`compare-A-vs-B` from the two labels, safe as a file name."""
    return f"compare-{result['a']['label']}-vs-{result['b']['label']}".replace("/", "_")


def write(result: dict, folder: Path, stem: str) -> tuple[Path, Path]:
    """FOLDER/STEM.json (the figures) and FOLDER/STEM.png (the chart), each written atomically."""
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise InputError(f"{folder} is a file; give a folder for the comparison with --out")
    folder.mkdir(parents=True, exist_ok=True)
    write_json(folder / f"{stem}.json", result)
    write_png(result, folder / f"{stem}.png")
    return folder / f"{stem}.json", folder / f"{stem}.png"


def write_png(result: dict, path: Path) -> None:
    """Bars: RTFx of each run, WER/CER of each, peak worker RSS of each; the speedup in the title."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg  # lazily: only compare and demo plot
    from matplotlib.figure import Figure

    a, b = result["a"], result["b"]
    labels = [a["label"], b["label"]]
    fig = Figure(figsize=(12, 4.2), layout="constrained")
    FigureCanvasAgg(fig)
    speed, errors, memory = fig.subplots(1, 3)
    _bars(speed, labels, {"RTFx": [a["rtfx"], b["rtfx"]]}, "speed", "x real time (higher is faster)", "{:,.0f}")
    _bars(
        errors,
        labels,
        {"WER": [_pct(a["wer"]), _pct(b["wer"])], "CER": [_pct(a["cer"]), _pct(b["cer"])]},
        "accuracy",
        "% (lower is better)",
        "{:.2f}%",
        empty="no references in the manifest",
    )
    rss = [r["peak_rss_mb"] or {} for r in (a, b)]
    _bars(
        memory,
        labels,
        {"max": [r.get("max") for r in rss], "mean": [r.get("mean") for r in rss]},
        "worker memory",
        "peak RSS per worker, MB",
        "{:,.0f}",
        empty="worker memory not recorded",
    )
    speedup = f"{result['speedup']:.2f}x speedup (RTFx)" if result["speedup"] else "no RTFx to compare"
    identical = result["agreement"]["identical"]
    same = "" if identical is None else f", {100 * identical:.1f}% identical transcripts"
    fig.suptitle(f"{labels[0]} vs {labels[1]}: {speedup}{same}", fontsize=13)
    fig.legend(*speed.get_legend_handles_labels(), loc="outside lower center", ncols=2)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    write_atomic(Path(path), buf.getvalue())


def _bars(ax, runs: list[str], series: dict[str, list], title: str, ylabel: str, fmt: str, empty: str = "") -> None:
    """Grouped bars: one group per series, one bar per run, each labelled with its value."""
    ax.set_title(title)
    if all(v is None for values in series.values() for v in values):
        ax.text(0.5, 0.5, empty, ha="center", va="center", transform=ax.transAxes)
        ax.set_axis_off()
        return
    width = 0.8 / len(runs)
    for i, run in enumerate(runs):
        values = [series[name][i] for name in series]
        bars = ax.bar(
            [g + (i - (len(runs) - 1) / 2) * width for g in range(len(series))],
            [v or 0.0 for v in values],
            width,
            label=run,
            color=f"C{i}",
        )
        ax.bar_label(bars, labels=["-" if v is None else fmt.format(v) for v in values], padding=2, fontsize=9)
    ax.set_xticks(range(len(series)), list(series))
    ax.set_ylabel(ylabel)
    ax.margins(y=0.15)


def _pct(value: float | None) -> float | None:
    return None if value is None else 100 * value
