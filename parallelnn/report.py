"""Tables (and, later, plots) made from run records only; nothing here trains.

``write_table`` and ``print_table`` are shared by ``parallelnn report`` and the ``bench`` verbs, so
a table looks the same wherever it comes from.
"""

from __future__ import annotations

import csv
import io
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from parallelnn.record import atomic_write_text

LABELS = {
    "train_seconds": "train s", "test_accuracy": "accuracy", "samples_per_second": "samples/s",
    "tokens_per_second": "tokens/s", "mfu": "MFU", "study_seconds": "study s", "study_accuracy": "study acc",
    "world_size": "nproc", "eval_loss": "eval loss", "comm_share": "comm share",
}


def fmt(value: Any, key: str = "") -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return ""
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, int):
        return f"{value:,}" if key.endswith("per_second") else str(value)
    if isinstance(value, float):
        if key.endswith("per_second"):
            return f"{value:,.0f}"
        if key in ("test_accuracy", "study_accuracy", "mfu", "efficiency", "comm_share"):
            return f"{value:.4f}" if "accuracy" in key else f"{value:.2f}"
        if key.endswith("seconds"):
            return f"{value:.2f}" if value >= 1 else f"{value:.3g}"
        return f"{value:.4g}"
    return str(value)


def markdown(rows: Sequence[dict[str, Any]], columns: Sequence[str]) -> str:
    head = "| " + " | ".join(LABELS.get(c, c.replace("_", " ")) for c in columns) + " |"
    rule = "|" + "|".join("---" for _ in columns) + "|"
    body = ["| " + " | ".join(fmt(r.get(c), c).replace("|", "/") for c in columns) + " |" for r in rows]
    return "\n".join([head, rule, *body]) + "\n"


def csv_text(rows: Sequence[dict[str, Any]], columns: Sequence[str]) -> str:
    buf = io.StringIO()
    writer = csv.writer(buf)
    writer.writerow(columns)
    for r in rows:
        writer.writerow(["" if r.get(c) is None else r.get(c) for c in columns])
    return buf.getvalue()


def write_table(rows: Sequence[dict[str, Any]], columns: Sequence[str], base: Path) -> list[Path]:
    """Write ``base.md`` and ``base.csv`` (atomically); return their paths."""
    base.parent.mkdir(parents=True, exist_ok=True)
    paths = []
    for suffix, text in ((".md", markdown(rows, columns)), (".csv", csv_text(rows, columns))):
        path = base.with_suffix(suffix)
        atomic_write_text(path, text)
        paths.append(path)
    return paths


def print_table(rows: Sequence[dict[str, Any]], columns: Sequence[str]) -> None:
    print(markdown(rows, columns), end="", flush=True)
