"""Run records: ``OUT/record.json`` (the final summary) and ``OUT/metrics.jsonl`` (events as they happen).

Records are the interface between training and everything that looks at training (report, bench,
speedup against a baseline): those read records and never re-run anything. record.json is written
once, atomically (temporary file + rename), so a reader never sees half of one. metrics.jsonl is an
append-only log: one JSON object a line, each with an ``event`` ("epoch", "step", "eval", ...) and
metric names in the Hugging Face style (``train/loss``, ``eval/loss``, ``eval/accuracy`` ...).

Only rank 0 writes; other ranks' figures are gathered to it first.
"""

from __future__ import annotations

import json
import os
import platform
import tempfile
from pathlib import Path
from typing import Any

import torch

import parallelnn
from parallelnn.errors import UserError

FORMAT_VERSION = 1
RECORD = "record.json"
METRICS = "metrics.jsonl"


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Write ``text`` to ``path`` so that readers see the old file or the whole new one, never a part."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(fd, 0o666 & ~_umask())  # mkstemp makes 0600; a record is as readable as any file
        with os.fdopen(fd, "w") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write_json(path: str | os.PathLike, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, default=_jsonable) + "\n")


def _jsonable(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.tolist()
    if isinstance(value, Path):
        return str(value)
    if hasattr(value, "item"):
        return value.item()
    raise TypeError(f"cannot store {type(value).__name__} in a record")


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def memory_bytes() -> int:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return 0


def hardware(device: torch.device) -> dict[str, Any]:
    gpu = None
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        gpu = {"name": props.name, "memory_bytes": props.total_memory, "count": torch.cuda.device_count(),
               "capability": f"{props.major}.{props.minor}"}
    elif device.type == "mps":
        gpu = {"name": "Apple MPS"}
    return {"cpu": cpu_model(), "cores": os.cpu_count(), "gpu": gpu, "memory_bytes": memory_bytes(),
            "host": platform.node(), "platform": platform.platform()}


def versions() -> dict[str, str]:
    return {"python": platform.python_version(), "torch": torch.__version__, "parallelnn": parallelnn.__version__}


def prepare_out_dir(out: str | os.PathLike, overwrite: bool) -> Path:
    """Check (without creating anything) that ``out`` may receive a run."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} exists and is not a directory")
    if (out / RECORD).exists() and not overwrite:
        raise UserError(f"--out {out} already holds a record; pass --overwrite to replace it")
    check_writable_place(out, "--out")
    return out


def check_writable_place(path: Path, flag: str) -> None:
    """Refuse, before any work, a path whose nearest existing folder cannot take new entries."""
    place = path if path.is_dir() else next((p for p in path.parents if p.exists()), Path("."))
    if not place.is_dir() or not os.access(place, os.W_OK):
        raise UserError(f"{flag} {path}: {place} is not writable")


class Recorder:
    """Rank 0's writer of metrics.jsonl and record.json; other ranks get one that writes nothing."""

    def __init__(self, out: Path | None, enabled: bool, append: bool = False):
        self.out, self.enabled = out, enabled and out is not None
        self._fh = None
        self.append = append
        self.sinks: list = []  # extra consumers of every event, e.g. TensorBoard

    def _open(self):
        if self._fh is None:
            self.out.mkdir(parents=True, exist_ok=True)
            self._fh = open(self.out / METRICS, "a" if self.append else "w")
        return self._fh

    def log(self, event: str, **values: Any) -> None:
        if not self.enabled:
            return
        line = {"event": event, **values}
        fh = self._open()
        fh.write(json.dumps(line, default=_jsonable) + "\n")
        fh.flush()
        for sink in self.sinks:
            sink(line)

    def finish(self, record: dict[str, Any]) -> Path | None:
        if not self.enabled:
            return None
        self._open()
        path = self.out / RECORD
        atomic_write_json(path, {"format_version": FORMAT_VERSION, **record})
        return path

    def close(self) -> None:
        if self._fh is not None:
            self._fh.close()
            self._fh = None
        for sink in self.sinks:  # e.g. TensorBoard's writer, which buffers
            if hasattr(sink, "close"):
                sink.close()
        self.sinks = []


def sha256_file(path: str | os.PathLike, gunzip: bool = False) -> str:
    """SHA-256 of a file's bytes (``gunzip``: of its decompressed content), read in 1 MiB blocks."""
    import gzip
    import hashlib

    digest = hashlib.sha256()
    with (gzip.open if gunzip else open)(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def read_record(path: str | os.PathLike) -> dict[str, Any]:
    """Read a record.json (or the record.json inside a run directory), checking its format."""
    path = Path(path)
    if path.is_dir():
        path = path / RECORD
    try:
        record = json.loads(path.read_text())
    except FileNotFoundError:
        raise UserError(f"{path}: no such record")
    except (OSError, ValueError) as err:
        raise UserError(f"{path}: unreadable record ({err})")
    if not isinstance(record, dict) or "workload" not in record:
        raise UserError(f"{path}: not a parallelnn record")
    if record.get("format_version", 1) > FORMAT_VERSION:
        raise UserError(f"{path}: record format {record['format_version']} is newer than this parallelnn "
                        f"understands ({FORMAT_VERSION}); upgrade parallelnn")
    return record


def read_metrics(run_dir: str | os.PathLike, superseded: bool = False) -> list[dict[str, Any]]:
    """The events of a run's metrics.jsonl; a torn last line (a killed writer) is ignored.

    A ``restart`` event marks a resume from a checkpoint at its ``train/global_step``: the events an
    earlier attempt wrote after that step were trained again, so they are dropped unless
    ``superseded`` asks to keep everything as written.
    """
    path = Path(run_dir) / METRICS
    events: list[dict[str, Any]] = []
    if not path.is_file():
        return events
    for line in path.read_text().splitlines():
        try:
            event = json.loads(line)
        except ValueError:
            continue
        if event.get("event") == "restart" and not superseded:
            resumed = event.get("train/global_step", 0)
            events = [e for e in events if e.get("train/global_step", 0) <= resumed]
        events.append(event)
    return events
