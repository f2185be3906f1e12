"""Formatting results for stdout (tables, JSON) and progress for a terminal's stderr."""

from __future__ import annotations

import json
import sys
from typing import Any


def table(rows: list[dict[str, Any]], columns: list[str], header: bool) -> str:
    cells = [[str(r[c]) for c in columns] for r in rows]
    if header:
        cells.insert(0, [c.upper() for c in columns])
    if not cells:
        return ""
    widths = [max(len(row[i]) for row in cells) for i in range(len(columns))]
    return "\n".join("  ".join(v.ljust(w) for v, w in zip(row, widths, strict=False)).rstrip()
                     for row in cells) + "\n"


def as_json(data: Any) -> str:
    return json.dumps(data, indent=1) + "\n"


class Progress:
    """A progress bar with ETA on stderr, only when stderr is a terminal (rich, lazily)."""

    def __init__(self, label: str) -> None:
        self.label = label
        self._bar: Any = None
        self._task: Any = None

    def __call__(self, done: int, total: int) -> None:
        if done >= total:
            self.close()
            return
        if total < (64 << 20):
            return  # small states finish before a bar is worth drawing
        if self._bar is None:
            # lazy: rich costs tens of ms; only a long transfer on a terminal draws a bar
            from rich import console, progress

            self._bar = progress.Progress(
                progress.TextColumn(self.label), progress.BarColumn(), progress.DownloadColumn(),
                progress.TimeRemainingColumn(), console=console.Console(stderr=True),
                transient=True)
            self._bar.start()
            self._task = self._bar.add_task(self.label, total=total)
        self._bar.update(self._task, completed=done, total=total)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.update(self._task, completed=self._bar.tasks[0].total)
            self._bar.stop()  # transient: the bar is erased, the result line stays
            self._bar = None


def progress(label: str) -> Progress | None:
    return Progress(label) if sys.stderr.isatty() else None
