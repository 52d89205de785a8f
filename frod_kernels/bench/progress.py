"""What frod-bench shows while it runs: a bar naming the measurement running now, and each row as it finishes."""

from __future__ import annotations

import sys

from .report import row_line


class Printer:
    """A suite's progress sink (:class:`.common.Quiet` is the silent one): ``start(label)`` moves a tqdm bar on
    stderr, ``done(row)`` prints the row's one-line summary on stdout at once, so a long suite is never silent."""

    def __init__(self, total: int):
        from tqdm import tqdm

        # disable=None: no bar when stderr is not a terminal (logs, CI), where it would only add noise.
        self.bar = tqdm(total=total, file=sys.stderr, unit="run", dynamic_ncols=True, leave=False, disable=None)
        self.started = False

    def start(self, label: str) -> None:
        if self.started:
            self.bar.update(1)
        self.started = True
        self.bar.set_description(label[:60])

    def done(self, row: dict) -> None:
        self.write(row_line(row))

    def write(self, text: str) -> None:
        self.bar.write(text, file=sys.stdout)
        sys.stdout.flush()

    def close(self) -> None:
        if self.started:
            self.bar.update(1)
        self.bar.close()
