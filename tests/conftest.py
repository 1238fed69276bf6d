"""Shared test helpers: an isolated cache, and running the CLI in-process or as a real subprocess."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SHARED_MNIST = ROOT.parent / "shared" / "data" / "mnist"


@pytest.fixture(autouse=True, scope="session")
def _isolated_cache(tmp_path_factory):
    """Peak-FLOP probes and downloads go to a private cache, not the user's."""
    cache = tmp_path_factory.mktemp("cache")
    os.environ["PARALLELNN_CACHE"] = str(cache)
    yield cache


def cli(*args: str, cwd: Path | None = None, env: dict | None = None, timeout: float = 600) -> subprocess.CompletedProcess:
    """Run ``python -m parallelnn ARGS`` as a user would; returns the completed process (text)."""
    full_env = {**os.environ, **(env or {})}
    return subprocess.run([sys.executable, "-m", "parallelnn", *args], capture_output=True, text=True,
                          cwd=cwd or ROOT, env=full_env, timeout=timeout)


def main(*args: str) -> int:
    """Run the CLI in this process (fast); returns the exit status."""
    from parallelnn.cli import main as _main

    return _main(list(args))


def record(out: Path) -> dict:
    return json.loads((Path(out) / "record.json").read_text())


def events(out: Path, kind: str | None = None) -> list[dict]:
    lines = [json.loads(line) for line in (Path(out) / "metrics.jsonl").read_text().splitlines()]
    return [e for e in lines if kind is None or e["event"] == kind]


def step_losses(out: Path) -> list[float]:
    return [e["train/loss"] for e in events(out, "step")]
