"""The report: one row per figure, the provisioner beside its floor, and the goal."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field


@dataclass
class Row:
    figure: str
    value: float | None
    floor: float | None = None
    unit: str = "s"          # s | B | MB | files | x
    goal: str = "-"
    # True/False: met or not; None: nothing to judge (report only).
    check: Callable[[float, float | None], bool] | None = None

    @property
    def ratio(self) -> float | None:
        if self.value is None or not self.floor or math.isnan(self.floor) \
                or math.isnan(self.value):
            return None
        return self.value / self.floor

    @property
    def met(self) -> str:
        if self.check is None:
            return "-"
        if self.value is None or math.isnan(self.value):
            return "n/a"
        return "yes" if self.check(self.value, self.floor) else "NO"


def at_most(limit: float) -> Callable[[float, float | None], bool]:
    return lambda value, floor: value <= limit


def below(limit: float) -> Callable[[float, float | None], bool]:
    return lambda value, floor: value < limit


def ratio_at_most(times: float) -> Callable[[float, float | None], bool]:
    return lambda value, floor: bool(floor) and value / floor <= times


def fmt(value: float | None, unit: str) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    if unit == "s":
        if value < 1:
            return f"{value * 1000:.1f} ms"
        return f"{value:.2f} s" if value < 100 else f"{value:.0f} s"
    if unit == "MB":
        return f"{value / 1e6:.1f} MB"
    if unit == "B":
        if value >= 1e6:
            return f"{value / 1e6:.2f} MB"
        if value >= 1e4:
            return f"{value / 1e3:.1f} kB"
        return f"{value:.0f} B"
    if unit == "files":
        return f"{value:.1f} files" if value < 100 else f"{value:.0f} files"
    return f"{value:g}"


def fmt_ratio(ratio: float | None) -> str:
    if ratio is None:
        return "-"
    return f"{ratio:.2f}x" if ratio < 10 else f"{ratio:.0f}x"


@dataclass
class Report:
    rows: list[Row] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def add(self, row: Row) -> Row:
        self.rows.append(row)
        return row

    def note(self, text: str) -> None:
        self.notes.append(text)

    def render(self) -> str:
        header = ("figure", "provisioner", "floor", "ratio", "goal", "met?")
        cells = [header] + [(r.figure, fmt(r.value, r.unit), fmt(r.floor, r.unit),
                             fmt_ratio(r.ratio), r.goal, r.met) for r in self.rows]
        widths = [max(len(row[i]) for row in cells) for i in range(len(header))]
        align = ["<", ">", ">", ">", "<", "<"]

        def line(row) -> str:
            return "| " + " | ".join(f"{c:{a}{w}}" for c, a, w in zip(row, align, widths,
                                                                       strict=True)) + " |"

        out = [line(header), "|" + "|".join("-" * (w + 2) for w in widths) + "|"]
        out += [line(row) for row in cells[1:]]
        if self.notes:
            out += ["", "notes:"] + [f"- {n}" for n in self.notes]
        return "\n".join(out)
