"""Rendering of job events for the CLI: a rich live display on a terminal, log lines otherwise."""

from __future__ import annotations

import logging
import time

from runner.job.events import EventKind

log = logging.getLogger("runner")


class LogProgress:
    """Plain log lines (--quiet, or stdout is not a terminal)."""

    def __init__(self):
        self.t0 = time.perf_counter()
        self.done = self.total = 0.0
        self.shards = self.todo = 0

    def __call__(self, kind: EventKind, **data) -> None:
        handlers = {
            EventKind.PLANNED: self.on_planned,
            EventKind.QUANTIZING: self.on_quantizing,
            EventKind.QUANTIZED: self.on_quantized,
            EventKind.WORKERS: self.on_workers,
            EventKind.SHARD: self.on_shard,
        }  # FINISHED: the CLI prints the run's figures itself
        handlers.get(kind, lambda **_: None)(**data)

    def on_planned(self, shards, todo, items, seconds, todo_seconds, split=None):
        self.total, self.todo = todo_seconds, todo
        log.info("%d items, %.1f h of audio in %d shards; %d to run", items, seconds / 3600, shards, todo)
        if split:
            log.info(
                "%d long line(s) split into %d segments (%d cut at pauses, %d forced)%s",
                split["lines"],
                split["segments"],
                split["at_pause"],
                split["forced"],
                f" in {split['seconds']:.2f} s" if split["seconds"] else ", as the job's plan records",
            )

    def on_quantizing(self, model):
        log.info("int8: calibrating and checking accuracy for %s (done once, then cached)", model)

    def on_quantized(self, sha256, from_cache, source, seconds, fp32_units, gate):
        from runner.int8.pipeline import gate_description

        source = {"cache": "from the cache", "job": "the job's own, from its output folder"}.get(
            source, f"made in {seconds:.1f} s"
        )
        kept = f"; kept in fp32: {', '.join(fp32_units)}" if fp32_units else ""
        log.info("int8 artifact %s (%s): %s%s", sha256[:12], source, gate_description(gate), kept)

    def on_workers(self, names, engines, startup):
        self.t0 = time.perf_counter()
        log.info(
            "%d workers ready in %.1f s (engines: %s)", len(names), startup, ", ".join(sorted(set(engines.values())))
        )

    def on_shard(self, shard, audio_seconds, worker, failed, errors):
        self.done += audio_seconds
        self.shards += 1
        rtfx = self.done / max(time.perf_counter() - self.t0, 1e-9)
        log.info(
            "shard %d done by %s (%d/%d): %.0f/%.0f s audio, RTFx %.0f, %d failed",
            shard,
            worker,
            self.shards,
            self.todo,
            self.done,
            self.total,
            rtfx,
            failed,
        )
        for err in errors:
            log.warning("error row: %s", err)

    def close(self):
        pass


class RichProgress(LogProgress):
    """Live bar in audio seconds with ETA and RTFx, and a table with each worker's state."""

    def __init__(self, console):
        from rich.live import Live
        from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

        super().__init__()
        self.console = console
        self.progress = Progress(
            TextColumn("{task.description}"),
            BarColumn(),
            TextColumn("{task.completed:,.0f}/{task.total:,.0f} s audio"),
            TimeElapsedColumn(),
            TextColumn("ETA"),
            TimeRemainingColumn(),
            TextColumn("{task.fields[info]}"),
            console=console,
        )
        self.live = Live(console=console, refresh_per_second=4, transient=False)
        self.main: int | None = None
        self.workers: dict[str, list] = {}  # name -> [engine, shards done, last shard, audio seconds]

    def on_planned(self, shards, todo, items, seconds, todo_seconds, split=None):
        super().on_planned(shards, todo, items, seconds, todo_seconds, split)
        self.main = self.progress.add_task("transcribing", total=max(todo_seconds, 1e-9), info="starting workers")
        self.live.update(self._render())
        self.live.start()

    def on_workers(self, names, engines, startup):
        super().on_workers(names, engines, startup)
        self.workers = {name: [engines[name], 0, "-", 0.0] for name in names}
        self.progress.update(self.main, info=f"{len(names)} workers ready in {startup:.1f} s")
        self.live.update(self._render())

    def on_shard(self, shard, audio_seconds, worker, failed, errors):
        self.done += audio_seconds
        self.shards += 1
        rtfx = self.done / max(time.perf_counter() - self.t0, 1e-9)
        self.progress.update(
            self.main,
            advance=audio_seconds,
            info=f"RTFx {rtfx:,.0f} · shards {self.shards}/{self.todo} · failed {failed}",
        )
        state = self.workers.setdefault(worker, ["?", 0, "-", 0.0])
        state[1:] = [state[1] + 1, str(shard), state[3] + audio_seconds]
        for err in errors:
            self.console.print(f"[yellow]error row:[/] {err}")
        self.live.update(self._render())

    def _render(self):
        from rich.console import Group
        from rich.table import Table

        table = Table(box=None, padding=(0, 2), show_edge=False)
        for column in ("worker", "engine", "shards", "last shard", "audio s"):
            table.add_column(column, justify="left" if column in ("worker", "engine") else "right")
        for name, (engine, count, last, seconds) in self.workers.items():
            table.add_row(name, engine, str(count), last, f"{seconds:,.0f}")
        return Group(self.progress, table)

    def close(self):
        if self.main is not None:
            self.live.update(self._render())
            self.live.stop()
