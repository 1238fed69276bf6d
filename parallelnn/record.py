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
from parallelnn.errors import OutputError, UserError, warn

FORMAT_VERSION = 1
RECORD = "record.json"
METRICS = "metrics.jsonl"
LOCK = ".parallelnn.lock"  # held by the run writing into an --out; removed when it ends


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
        self._failed = False  # a write failed (full disk): the next line starts on a line of its own
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
        text = json.dumps(line, default=_jsonable) + "\n"
        try:
            fh = self._open()
            fh.write(("\n" if self._failed else "") + text)
            fh.flush()
            self._failed = False
        except OSError as err:  # training goes on; a torn line is skipped by readers
            if not self._failed:
                warn(f"{self.out / METRICS}: events not written ({err.strerror or err}); training goes on")
            self._failed = True
            self._reopen()
        for sink in self.sinks:
            sink(line)

    def _reopen(self) -> None:
        try:
            if self._fh is not None:
                self._fh.close()
        except OSError:
            pass
        self._fh = None
        self.append = True

    def finish(self, record: dict[str, Any], last_checkpoint: Any = None) -> Path | None:
        if not self.enabled:
            return None
        path = self.out / RECORD
        write_or_explain(path, lambda: atomic_write_json(path, {"format_version": FORMAT_VERSION, **record}),
                         last_checkpoint)
        return path

    def close(self) -> None:
        if self._fh is not None:
            self._fh.close()
            self._fh = None
        for sink in self.sinks:  # e.g. TensorBoard's writer, which buffers
            if hasattr(sink, "close"):
                sink.close()
        self.sinks = []


def write_or_explain(path: Path, write, last_checkpoint: Any = None) -> None:
    """``write()``, or one line (:class:`OutputError`) naming what could not be written and the last
    good checkpoint, whatever the failure's type (a full disk raises OSError, RuntimeError, SafetensorError)."""
    try:
        write()
    except Exception as err:  # noqa: BLE001 - see the docstring
        why = err.strerror if isinstance(err, OSError) and err.strerror else " ".join(str(err).split())[:200]
        where = (f"the last good checkpoint is {last_checkpoint} (continue with --resume auto once there is room)"
                 if last_checkpoint else "no checkpoint of this run was saved")
        raise OutputError(f"could not write {path} ({type(err).__name__}: {why}); {where}") from None


class OutLock:
    """One run per --out: ``OUT/.parallelnn.lock`` holds an exclusive ``flock`` and the owner's PID and
    host. A second run is refused naming them; the lock of a process that is gone (the kernel dropped
    its flock) is taken over with a warning. The file is removed when the run ends."""

    def __init__(self, out: str | os.PathLike):
        self.out = Path(out)
        self.path = self.out / LOCK
        self.fd: int | None = None

    def acquire(self, announce_takeover: bool = True) -> "OutLock":
        import fcntl

        try:
            self.out.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise UserError(f"--out {self.out}: cannot create it ({err.strerror or err})")
        for _ in range(20):
            try:
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            except OSError as err:
                raise UserError(f"--out {self.out}: cannot create {LOCK} ({err.strerror or err})")
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                owner = _read_owner(fd)
                os.close(fd)
                who = f"PID {owner.get('pid')} on {owner.get('host')}" if owner else "another process"
                raise UserError(f"--out {self.out} is in use by another run ({who}): wait for it to end, or "
                                "choose another --out")
            try:  # the holder before us may have removed the file after we opened it: lock the current one
                same = os.fstat(fd).st_ino == os.stat(self.path).st_ino
            except FileNotFoundError:
                same = False
            if not same:
                os.close(fd)
                continue
            owner = _read_owner(fd)
            if owner and announce_takeover and owner.get("pid") != os.getpid():
                warn(f"--out {self.out}: taking over the lock of PID {owner.get('pid')} on {owner.get('host')}, "
                     "which is no longer running")
            data = json.dumps({"pid": os.getpid(), "host": platform.node(), "since": _now()}).encode()
            try:
                os.ftruncate(fd, 0)
                os.pwrite(fd, data, 0)
            except OSError:
                pass  # a full disk: the flock alone still keeps other runs out
            self.fd = fd
            return self
        raise UserError(f"--out {self.out}: could not take {LOCK}")

    def release(self) -> None:
        if self.fd is None:
            return
        try:
            self.path.unlink(missing_ok=True)
        except OSError:
            pass
        os.close(self.fd)
        self.fd = None


def _read_owner(fd: int) -> dict[str, Any]:
    try:
        owner = json.loads(os.pread(fd, 4096, 0) or b"{}")
        return owner if isinstance(owner, dict) else {}
    except (OSError, ValueError):
        return {}


def _now() -> str:
    import datetime

    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


_LOCKS: dict[str, OutLock] = {}


def lock_out_dir(out: str | os.PathLike, announce_takeover: bool = True) -> None:
    """Take ``out``'s lock for this process (a no-op when it already holds it)."""
    key = os.path.realpath(out)
    if key not in _LOCKS:
        _LOCKS[key] = OutLock(out).acquire(announce_takeover)


def unlock_out_dirs() -> None:
    while _LOCKS:
        _LOCKS.popitem()[1].release()


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
    version = record.get("format_version", 1)
    if not isinstance(version, int) or isinstance(version, bool) or version < 1:
        raise UserError(f"{path}: record format {version!r} is not one parallelnn wrote")
    if version > FORMAT_VERSION:
        raise UserError(f"{path}: record format {record['format_version']} is newer than this parallelnn "
                        f"understands ({FORMAT_VERSION}); upgrade parallelnn")
    problem = check_record(record)
    if problem:
        raise UserError(f"{path}: {problem}")
    return record


# Fields readers compute with: their types (numbers must be finite where a ratio is taken from them).
RECORD_FIELDS = {"workload": str, "strategy": str, "world_size": int, "samples_per_second": (int, float),
                 "train_seconds": (int, float), "mfu": (int, float), "test_accuracy": (int, float),
                 "test_loss": (int, float), "epochs": int, "batch_size": int, "steps": int}
FINITE = ("world_size", "samples_per_second", "train_seconds", "epochs", "batch_size", "steps")


def check_record(record: dict[str, Any]) -> str | None:
    """Why a record's fields cannot be computed with (a wrong type, a NaN where a ratio is taken), or None."""
    import math

    for key, kind in RECORD_FIELDS.items():
        value = record.get(key)
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, kind):
            what = "an integer" if kind is int else "a string" if kind is str else "a number"
            return f"field '{key}' is {value!r}, not {what}"
        if key in FINITE and isinstance(value, float) and not math.isfinite(value):
            return f"field '{key}' is {value}, not a finite number"
    return None


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
