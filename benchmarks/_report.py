"""Figures, the limits they are compared with, and how they are printed.

Absolute times on a shared machine drift by about 20% between runs, so every
figure is printed next to a limit measured in the same run (a bare spawn, a
bare websocket server, the idle state) and their ratio. Targets are printed
as met or missed; nothing here fails.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

MiB = 1024 * 1024
PERCENTILES = {"p50": 0.50, "p90": 0.90, "p99": 0.99, "max": 1.0}


@dataclass
class Row:
    """One line of the table."""

    benchmark: str
    measure: str
    value: float
    unit: str
    limit: float | None = None
    limit_name: str = ""
    target: str = ""
    met: bool | None = None

    @property
    def ratio(self) -> float | None:
        if self.limit is None or self.limit == 0:
            return None
        return self.value / self.limit


@dataclass(frozen=True)
class Target:
    """A target on one percentile row: ``met(figure, limit)`` decides it."""

    label: str
    text: str
    met: Callable[[float, float], bool]


@dataclass
class BenchResult:
    """What one benchmark function returns: its rows and the raw details."""

    name: str
    rows: list[Row] = field(default_factory=list)
    details: dict[str, Any] = field(default_factory=dict)
    seconds: float = 0.0

    def add(self, *args: Any, **kwargs: Any) -> Row:
        row = Row(self.name, *args, **kwargs)
        self.rows.append(row)
        return row

    def add_percentiles(
        self,
        measure: str,
        samples: Sequence[float],
        limit_samples: Sequence[float],
        limit_name: str,
        labels: Sequence[str] = ("p50", "p90", "p99"),
        target: Target | None = None,
    ) -> None:
        """One row per percentile of seconds, shown in ms against the same percentile."""
        for label in labels:
            value = percentile(samples, PERCENTILES[label]) * 1000
            limit = percentile(limit_samples, PERCENTILES[label]) * 1000
            if target is not None and target.label == label:
                self.add(
                    f"{measure} {label}",
                    value,
                    "ms",
                    limit,
                    limit_name,
                    target=target.text,
                    met=target.met(value, limit),
                )
            else:
                self.add(f"{measure} {label}", value, "ms", limit, limit_name)


def percentile(samples: Sequence[float], fraction: float) -> float:
    """Linear interpolation between closest ranks (``fraction`` in 0..1)."""
    if not samples:
        return math.nan
    ordered = sorted(samples)
    position = fraction * (len(ordered) - 1)
    low = math.floor(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


def summarise(samples: Sequence[float]) -> dict[str, float]:
    """p50/p90/p99/max/mean of seconds, in milliseconds, for the JSON details."""
    if not samples:
        return {"count": 0}
    return {
        "count": len(samples),
        "p50_ms": percentile(samples, 0.50) * 1000,
        "p90_ms": percentile(samples, 0.90) * 1000,
        "p99_ms": percentile(samples, 0.99) * 1000,
        "max_ms": max(samples) * 1000,
        "mean_ms": sum(samples) / len(samples) * 1000,
    }


def format_value(value: float | None, unit: str) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    if unit == "count":
        return f"{value:.0f}"
    if unit == "ms":
        return f"{value:.2f} ms"
    if unit == "s":
        return f"{value:.3f} s"
    if unit in ("MiB", "MiB/s"):
        return f"{value:.1f} {unit}"
    if unit == "x":
        return f"{value:.2f}x"
    return f"{value:g} {unit}".rstrip()


def _verdict(met: bool | None) -> str:
    if met is None:
        return ""
    return "met" if met else "MISSED"


def render_table(rows: Sequence[Row]) -> str:
    header = ("benchmark", "measure", "figure", "limit", "limit is", "ratio", "target", "")
    lines = [
        (
            row.benchmark,
            row.measure,
            format_value(row.value, row.unit),
            format_value(row.limit, row.unit),
            row.limit_name,
            "-" if row.ratio is None else f"{row.ratio:.2f}",
            row.target,
            _verdict(row.met),
        )
        for row in rows
    ]
    widths = [max(len(cells[i]) for cells in [header, *lines]) for i in range(len(header))]
    right_aligned = {2, 3, 5}

    def render(cells: Sequence[str]) -> str:
        parts = [
            cell.rjust(width) if i in right_aligned else cell.ljust(width)
            for i, (cell, width) in enumerate(zip(cells, widths))
        ]
        return "  ".join(parts).rstrip()

    rule = "  ".join("-" * width for width in widths)
    return "\n".join([render(header), rule, *(render(cells) for cells in lines)])


def write_json(path: Path, meta: dict[str, Any], results: Sequence[BenchResult]) -> None:
    document = {
        "meta": meta,
        "rows": [{**asdict(row), "ratio": row.ratio} for result in results for row in result.rows],
        "benchmarks": {
            result.name: {"seconds": result.seconds, **result.details} for result in results
        },
    }
    path.write_text(json.dumps(_without_nan(document), indent=2, allow_nan=False) + "\n")


def _without_nan(value: Any) -> Any:
    """JSON has no NaN: a figure that could not be measured becomes null."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {key: _without_nan(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_without_nan(item) for item in value]
    return value
