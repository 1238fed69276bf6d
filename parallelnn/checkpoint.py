"""Checkpoints: save everything a run needs to continue exactly, atomically; find the newest good one
of *this* run; treat every file in a checkpoint as untrusted input.

A checkpoint is a directory ``CHECKPOINT_DIR/step-000000120/``:

* weights and optimizer tensors under the original model's parameter names (so another layout can
  load them): one process writes ``model.safetensors`` + ``optimizer.safetensors``; several processes
  write one ``torch.distributed.checkpoint`` (DCP) of the tensors, each rank its own shards, so FSDP
  shards are saved and loaded without gathering, and DCP reshards when the number of ranks changes;
* ``trainer.json``: the optimizer's other state (hyper-parameters, as a JSON tree), the training
  loop's state (step, epoch, position in the epoch, losses...), LR scheduler, grad scaler, and what
  model and settings it belongs to (workload, parameter shapes, seed, data...);
* ``rng-rank{R}.json``: every RNG state of every rank (python, numpy, torch CPU and CUDA);
* ``MANIFEST.json``, written last: the run it belongs to (run id, ``--out``, settings fingerprint), its
  step, the layout, and size and SHA-256 of every file.

What is saved and restored is a set of state_dict-style objects (``Stateful``: ``state_dict()`` /
``load_state_dict()``): the model+optimizer, the scheduler, the scaler, the RNGs and whatever the
caller passes (the trainer's loop). The checkpointer never looks inside them.

It is written under ``.step-N.partial`` and renamed when complete. Before anything is read, the
manifest is checked (see :func:`verify`): a file it does not list, a missing file, a size or checksum
that differs, a step that does not match the folder name or the loop state, an empty file list: not
a checkpoint. Nothing is unpickled by an unrestricted unpickler (see :mod:`parallelnn.safeio`).
The checkpoint directory must be shared by all machines of a multi-machine job.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import re
import shutil
import uuid
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from parallelnn import faults
from parallelnn.errors import UserError, warn
from parallelnn.launch import agree, gather
from parallelnn.record import METRICS, atomic_write_json, sha256_file
from parallelnn.safeio import UnsafeCheckpoint, dcp_load, join_tensors, split_tensors


def dcp_errors() -> tuple[type[BaseException], ...]:
    """DCP's CheckpointException (a BaseException), when DCP is loaded. It is imported only by a run that
    checkpoints (0.6 s of every process's start otherwise): if it is not loaded, nothing raised it."""
    import sys

    api = sys.modules.get("torch.distributed.checkpoint.api")
    return (api.CheckpointException,) if api is not None else ()


def write_errors() -> tuple[type[BaseException], ...]:
    """What a failed write raises: OSError, RuntimeError (torch.save), SafetensorError, and DCP's
    CheckpointException. Not KeyboardInterrupt or SystemExit."""
    return (Exception, *dcp_errors())


MANIFEST = "MANIFEST.json"
STATE = "trainer.json"
STEP_DIR = re.compile(r"^step-(\d+)$")
FORMAT = 2
# Settings that define what is trained: a resume with other values is refused unless --allow-changes.
DATA_SETTINGS = ("data", "limit", "seed", "batch_size", "test_size", "model", "context", "columns", "template")
# Settings applied from the resume on (and recorded as changed): they take effect in the resumed steps.
APPLIED_SETTINGS = ("lr", "epochs", "precision", "grad_accum", "max_grad_norm", "warmup_steps")


def _barrier(ctx) -> None:
    if ctx.multi_rank:
        dist.barrier()


def step_name(step: int) -> str:
    return f"step-{step:09d}"


# -- RNG ---------------------------------------------------------------------------------------------

def rng_state() -> dict[str, Any]:
    """Every RNG of this process as JSON-able numbers."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    version, internal, gauss_next = random.getstate()
    state = {"python": [version, list(internal), gauss_next],
             "numpy": [kind, keys.tolist(), int(pos), int(has_gauss), float(gauss)],
             "torch": torch.get_rng_state().tolist()}
    if torch.cuda.is_available():
        state["cuda"] = [s.tolist() for s in torch.cuda.get_rng_state_all()]
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    version, internal, gauss_next = state["python"]
    random.setstate((version, tuple(internal), gauss_next))
    kind, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((kind, np.asarray(keys, dtype=np.uint32), pos, has_gauss, gauss))
    torch.set_rng_state(torch.tensor(state["torch"], dtype=torch.uint8))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([torch.tensor(s, dtype=torch.uint8) for s in state["cuda"]])


class RNGState:
    """This process's random streams as a Stateful."""

    def state_dict(self) -> dict[str, Any]:
        return rng_state()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        set_rng_state(state)


class ModelOptimizerState:
    """The engine's model and optimizer as a Stateful, under the original model's parameter names
    (``full``: whole tensors, for one process; else each rank's shards, for DCP)."""

    def __init__(self, engine, full: bool):
        self.engine, self.full = engine, full

    def state_dict(self) -> dict[str, Any]:
        model_sd, optim_sd = self.engine.checkpoint_state(full=self.full)
        return {"model": model_sd, "optim": optim_sd}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.engine.load_checkpoint_state(state["model"], state["optim"], full=self.full)


# -- finding and checking ------------------------------------------------------------------------------

def read_manifest(path: Path) -> tuple[dict[str, Any] | None, str | None]:
    """(manifest, None) or (None, why it is not a usable one)."""
    manifest = path / MANIFEST
    if not manifest.is_file():
        return None, "no manifest (incomplete)"
    try:
        data = json.loads(manifest.read_text())
    except (OSError, ValueError) as err:
        return None, f"unreadable manifest ({err})"
    if not isinstance(data, dict) or not isinstance(data.get("files"), dict):
        return None, "manifest lists no files"
    if data.get("format") != FORMAT:
        return None, (f"written by another version of parallelnn (checkpoint format {data.get('format', 1)}, "
                      f"this one reads {FORMAT})")
    if not data["files"]:
        return None, "manifest lists no files: not a checkpoint"
    if not isinstance(data.get("step"), int) or not isinstance(data.get("run"), dict):
        return None, "manifest has no step or run"
    for name, meta in data["files"].items():
        if not (isinstance(meta, dict) and isinstance(meta.get("size"), int) and isinstance(meta.get("sha256"), str)):
            return None, f"manifest entry {name!r} is malformed"
    return data, None


def _entries(path: Path) -> list[str]:
    """Every file, folder and link below ``path``, as relative paths."""
    return sorted(str(p.relative_to(path)) for p in path.rglob("*"))


def verify(path: Path) -> str | None:
    """Why ``path`` is not a complete, intact checkpoint, or None when it is.

    Checked before any of its content is read: the manifest is well formed and lists files; every
    entry under ``path`` is the manifest itself, a listed file or a folder holding listed files (an
    extra file or folder is refused by name); every listed file has its size and SHA-256; the step in
    the folder name, the manifest and the loop state agree; the files of its layout are there.
    """
    data, problem = read_manifest(path)
    if problem:
        return problem
    files = data["files"]
    listed_dirs = {str(p) for name in files for p in Path(name).parents if str(p) != "."}
    for entry in _entries(path):
        p = path / entry
        if entry == MANIFEST:
            continue
        if p.is_symlink():
            return f"{entry} is a link, which no checkpoint holds"
        if p.is_dir() and entry in listed_dirs:
            continue
        if entry not in files:
            return f"{entry} is not in the manifest: refused (a checkpoint holds only the files it lists)"
    for name, meta in files.items():
        f = path / name
        if ".." in Path(name).parts or Path(name).is_absolute():
            return f"manifest names {name!r}, outside the checkpoint"
        if not f.is_file():
            return f"{name} is missing"
        if f.stat().st_size != meta["size"]:
            return f"{name} has {f.stat().st_size} bytes, the manifest says {meta['size']}"
        if sha256_file(f) != meta["sha256"]:
            return f"{name} does not match its checksum"
    m = STEP_DIR.match(path.name)
    if m and int(m.group(1)) != data["step"]:
        return f"the folder name says step {int(m.group(1))}, the manifest step {data['step']}"
    needed = [STATE, "rng-rank0.json"] + (["dcp/.metadata"] if data.get("layout") == "dcp"
                                           else ["model.safetensors", "optimizer.safetensors"])
    for name in needed:
        if name not in files:
            return f"{name} is missing"
    try:
        state = json.loads((path / STATE).read_text())
    except (OSError, ValueError) as err:
        return f"unreadable {STATE} ({err})"
    problem = _check_state(state)
    if problem:
        return problem
    if state["loop"]["global_step"] != data["step"]:
        return f"{STATE} is at step {state['loop']['global_step']}, the manifest says {data['step']}"
    return None


def _check_state(state: Any) -> str | None:
    if not isinstance(state, dict):
        return f"{STATE} is not an object"
    for key, kind in (("workload", str), ("fingerprint", dict), ("loop", dict), ("settings", dict),
                      ("world_size", int), ("strategy", str), ("optim", (dict, list))):
        if not isinstance(state.get(key), kind):
            return f"{STATE} has no valid '{key}'"
    loop = state["loop"]
    for key in ("global_step", "epoch", "step_in_epoch", "samples"):
        if not isinstance(loop.get(key), int) or isinstance(loop.get(key), bool) or loop[key] < 0:
            return f"{STATE}: loop has no valid '{key}'"
    return None


def candidates(directory: Path) -> list[tuple[int, Path]]:
    """(step, checkpoint folder) by the folder names, highest step first."""
    if not directory.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in directory.iterdir() if (m := STEP_DIR.match(p.name)) and p.is_dir()]
    return sorted(found, key=lambda sp: sp[0], reverse=True)


def find_newest_good(directory: Path, owns=None) -> Path | None:
    """The newest checkpoint that verifies (and that ``owns(manifest)`` accepts: None when it does,
    else why not); each one skipped on the way is named in a warning."""
    for _, path in candidates(directory):
        problem = verify(path)
        if problem is None and owns is not None:
            problem = owns(read_manifest(path)[0])
        if problem is None:
            return path
        warn(f"skipping checkpoint {path}: {problem}")
    return None


def settings_of(cfg) -> dict[str, Any]:
    return {k: getattr(cfg, k, None) for k in DATA_SETTINGS + APPLIED_SETTINGS}


def read_run_id(out: Path) -> str | None:
    """The run id in ``out``'s metrics.jsonl (the last ``run`` event), if any."""
    run_id = None
    try:
        with open(out / METRICS) as fh:
            for line in fh:
                if '"run"' not in line:
                    continue
                try:
                    event = json.loads(line)
                except ValueError:
                    continue
                if event.get("event") == "run" and isinstance(event.get("run_id"), str):
                    run_id = event["run_id"]
    except OSError:
        pass
    return run_id


# -- the checkpointer ----------------------------------------------------------------------------------

class Checkpointer:
    """Saves and restores one run's checkpoints (every rank has one; rank 0 does the file keeping)."""

    def __init__(self, cfg, ctx, engine, built, directory: Path, out: Path | None = None, recorder=None):
        self.cfg, self.ctx, self.engine, self.built = cfg, ctx, engine, built
        self.directory = directory
        self.out = os.path.realpath(out) if out is not None else None
        self.saved: list[Path] = []
        self.changes: dict[str, Any] = {}  # settings a resume changed: {name: {"from", "to", "at_step"}}
        self.resuming = bool(cfg.resume) or ctx.restart_count > 0
        run_id = None
        if ctx.is_main:
            run_id = (read_run_id(Path(out)) if self.resuming and out is not None else None)
            self.known_run_id = run_id is not None
            run_id = run_id or uuid.uuid4().hex[:16]
        self.run_id, self.known_run_id = agree((run_id, getattr(self, "known_run_id", False)), ctx)
        self.recorder = recorder
        if recorder is not None and not self.known_run_id:
            recorder.log("run", run_id=self.run_id)
        self._foreign_warned: set[str] = set()

    # -- identity ----------------------------------------------------------------------------------
    def fingerprint(self) -> dict[str, list[int]]:
        return {k: list(v.shape) for k, v in self.built.model.state_dict().items()}

    def identity(self) -> dict[str, Any]:
        """Which run a checkpoint belongs to: run id, --out, and a fingerprint of what is trained."""
        what = {"workload": self.cfg.workload, "settings": {k: getattr(self.cfg, k, None) for k in DATA_SETTINGS},
                "model": self.fingerprint()}
        digest = hashlib.sha256(json.dumps(what, sort_keys=True, default=str).encode()).hexdigest()[:16]
        return {"run_id": self.run_id, "out": self.out, "config": digest}

    def owns(self, manifest: dict[str, Any]) -> str | None:
        """None when a checkpoint with this manifest belongs to this run, else why not."""
        run = manifest.get("run") or {}
        if run.get("out") != self.out:
            return f"it belongs to another run (--out {run.get('out')}, run id {run.get('run_id')})"
        if self.known_run_id and run.get("run_id") != self.run_id:
            return (f"it belongs to an earlier run in this --out (run id {run.get('run_id')}, this run is "
                    f"{self.run_id})")
        return None

    def check_writable(self) -> None:
        """Fail before training, not at the first save, when checkpoints cannot be written or the
        directory holds another run's checkpoints (whose names this run's would take)."""
        error = None
        if self.ctx.is_main:
            try:
                self.directory.mkdir(parents=True, exist_ok=True)
                probe = self.directory / f".write-test-{os.getpid()}"
                probe.write_text("")
                probe.unlink()
            except OSError as err:
                error = f"--checkpoint-dir {self.directory} is not writable: {err.strerror or err}"
            if error is None:
                error = self._claim()
        error = agree(error, self.ctx)
        if error:
            raise UserError(error)

    def _claim(self) -> str | None:
        replaced = []
        for step, path in candidates(self.directory):
            manifest, _ = read_manifest(path)
            if manifest is None:
                continue  # incomplete or damaged: no run's checkpoint (resume skips it, a save replaces it)
            run = manifest.get("run") or {}
            if run.get("out") != self.out:
                return (f"--checkpoint-dir {self.directory} holds {path.name} of another run (--out {run.get('out')}): "
                        "give each run its own --checkpoint-dir")
            if run.get("run_id") == self.run_id or (self.resuming and not self.known_run_id):
                continue
            if self.resuming:
                continue  # an earlier run's checkpoint: --resume auto skips it, saving will not replace it
            if not self.cfg.overwrite:
                return (f"--checkpoint-dir {self.directory} holds {path.name} of an earlier run in --out "
                        f"{self.out}: continue it with --resume auto, or pass --overwrite to start afresh")
            replaced.append(path)
        if replaced:
            warn(f"--overwrite: removing {len(replaced)} checkpoint(s) of the earlier run in {self.directory}")
            for path in replaced:
                shutil.rmtree(path, ignore_errors=True)
        return None

    # -- saving ----------------------------------------------------------------------------------------
    def stateful(self, **extra) -> dict[str, Any]:
        """The JSON-stored Stateful objects: the engine's scheduler and scaler, and ``extra``."""
        from torch.distributed.checkpoint.stateful import Stateful

        items = {k: v for k, v in {"scheduler": self.engine.scheduler, "scaler": self.engine.scaler, **extra}.items()
                 if v is not None}
        for name, obj in items.items():
            if not isinstance(obj, Stateful):
                raise TypeError(f"{name}: {type(obj).__name__} has no state_dict()/load_state_dict()")
        return items

    def save(self, step: int, **extra) -> Path | None:
        """Checkpoint the state of every Stateful (the engine's and ``extra``, e.g. ``loop=trainer``)
        at ``step``. On any failure to write (a full disk raises OSError, RuntimeError, SafetensorError
        or DCP's CheckpointException): warn, remove the partial files, keep the previous checkpoint."""
        final = self.directory / step_name(step)
        partial = self.directory / f".{step_name(step)}.partial"
        if self.saved and self.saved[-1] == final:
            return final  # already saved at this step (a stop right after a periodic checkpoint)
        ok, why = True, ""
        if self.ctx.is_main:
            try:
                theirs = read_manifest(final)[0] if final.exists() else None
                if theirs is not None and (theirs.get("run") or {}).get("run_id") != self.run_id:
                    raise FileExistsError(f"{final} holds another run's checkpoint; not replaced")
                shutil.rmtree(partial, ignore_errors=True)
                partial.mkdir(parents=True)
            except write_errors() as err:
                ok, why = False, _why(err)
        ok, why = self._all_ok(ok, why)  # also: no rank writes before the folder is there
        if ok:
            try:
                self._write(partial, step, extra)
            except write_errors() as err:  # every failure to write is survivable
                ok, why = False, _why(err)
        ok, why = self._all_ok(ok, why)
        if ok and self.ctx.is_main:
            try:
                files = {str(p.relative_to(partial)): {"size": p.stat().st_size, "sha256": sha256_file(p)}
                         for p in sorted(partial.rglob("*")) if p.is_file()}
                atomic_write_json(partial / MANIFEST, {
                    "format": FORMAT, "step": step, "layout": "dcp" if self.ctx.multi_rank else "single",
                    "run": self.identity(), "files": files})
                shutil.rmtree(final, ignore_errors=True)
                os.replace(partial, final)
            except write_errors() as err:
                ok, why = False, _why(err)
        if not ok and self.ctx.is_main:
            shutil.rmtree(partial, ignore_errors=True)
        ok, why = self._all_ok(ok, why)
        if not ok:
            if self.ctx.is_main:
                last = (f"the previous one is kept: {self.saved[-1]}" if self.saved
                        else "there is no earlier checkpoint of this run")
                warn(f"checkpoint at step {step} not saved ({why}); {last}; training goes on")
            return None
        self.saved.append(final)
        if self.ctx.is_main:
            self._prune(step)
        return final

    def last_good(self) -> Path | None:
        """This run's newest complete checkpoint: the last one saved, or the one it resumed from."""
        return self.saved[-1] if self.saved else None

    def _all_ok(self, ok: bool, why: str) -> tuple[bool, str]:
        if not self.ctx.multi_rank:
            return ok, why
        results = gather((ok, why), self.ctx)
        bad = [w for o, w in results if not o]
        return not bad, (bad[0] if bad else "")

    def _write(self, directory: Path, step: int, extra: dict[str, Any]) -> None:
        distributed = self.ctx.multi_rank
        sd = ModelOptimizerState(self.engine, full=not distributed).state_dict()
        optim_tree, optim_tensors = split_tensors(sd["optim"])
        if distributed:
            import torch.distributed.checkpoint as dcp

            # Only tensors go into DCP; the optimizer's other values are gathered into trainer.json.
            dcp.save({"model": sd["model"], "optim": optim_tensors}, checkpoint_id=str(directory / "dcp"))
            optim_trees = gather(optim_tree, self.ctx)
        else:
            from safetensors.torch import save_file

            save_file({k: v.detach().cpu().contiguous().clone() for k, v in sd["model"].items()},
                      str(directory / "model.safetensors"))
            faults.before_save_completes(self.ctx, step)
            save_file({k: v.detach().cpu().contiguous().clone() for k, v in optim_tensors.items()},
                      str(directory / "optimizer.safetensors"))
            optim_trees = [optim_tree]
        with open(directory / f"rng-rank{self.ctx.rank}.json", "w") as fh:
            json.dump(RNGState().state_dict(), fh)
        faults.before_save_completes(self.ctx, step)
        if self.ctx.is_main:
            state = {name: obj.state_dict() for name, obj in self.stateful(**extra).items()}
            if distributed:  # each rank's non-tensor optimizer values (pipeline stages hold different ones)
                merged: dict[str, Any] = {}
                for tree in optim_trees:
                    merged.update(tree)
                optim = merged
            else:
                optim = optim_trees[0]
            atomic_write_json(directory / STATE, {
                "workload": self.cfg.workload, "dataset": self.built.dataset, "strategy": self.cfg.strategy,
                "world_size": self.ctx.world_size, "batch_size": self.cfg.batch_size, "seed": self.cfg.seed,
                "settings": settings_of(self.cfg), "fingerprint": self.fingerprint(), "optim": optim, **state,
            })

    def _prune(self, step: int) -> None:
        """Keep this run's newest --keep checkpoints up to ``step``; never one that is newer than
        ``step`` or that another run wrote."""
        mine = []
        for s, path in candidates(self.directory):
            if s > step:
                continue
            manifest, _ = read_manifest(path)
            if manifest is not None and (manifest.get("run") or {}).get("run_id") == self.run_id \
                    and manifest.get("step") == s:
                mine.append(path)
        for old in mine[self.cfg.keep:]:
            shutil.rmtree(old, ignore_errors=True)

    # -- resuming --------------------------------------------------------------------------------------
    def resume_path(self, explicit: str | None) -> Path | None:
        """The checkpoint to resume from (rank 0 decides, every rank gets the same answer)."""
        path: Path | None = None
        error: str | None = None
        if self.ctx.is_main:
            if explicit and explicit != "auto":
                p = Path(explicit)
                if (p / MANIFEST).exists() or STEP_DIR.match(p.name):
                    problem = verify(p)
                    if problem:
                        error = f"--resume {p}: not a usable checkpoint: {problem}"
                    path = p
                else:  # a directory of checkpoints
                    path = find_newest_good(p)
                    if path is None:
                        error = f"--resume {p}: no complete checkpoint in it"
            else:
                path = find_newest_good(self.directory, self.owns)
        path, error = agree((path, error), self.ctx)
        if error:
            raise UserError(error)
        return path

    def load(self, path: Path, **extra) -> dict[str, Any]:
        """Restore every Stateful (the engine's and ``extra``) from the checkpoint at ``path``, which
        :meth:`resume_path` verified. Settings that differ are refused or applied and noted in
        :attr:`changes`."""
        manifest, problem = read_manifest(path)
        meta = json.loads((path / STATE).read_text()) if problem is None else None
        if problem is None:
            problem = _check_state(meta)
        if problem:
            raise UserError(f"checkpoint {path}: {problem}")
        self._check_matches(path, meta)
        try:
            if manifest.get("layout") != "dcp":  # whole tensors (several ranks shard them as they load)
                from safetensors.torch import load_file

                model_sd = load_file(str(path / "model.safetensors"))
                current, _ = split_tensors(ModelOptimizerState(self.engine, full=True).state_dict()["optim"])
                problem = _kind_problem(current, meta["optim"])
                if problem:
                    raise UserError(f"checkpoint {path}: optimizer state {problem}")
                optim_sd = join_tensors(meta["optim"], load_file(str(path / "optimizer.safetensors")))
                ModelOptimizerState(self.engine, full=True).load_state_dict({"model": model_sd, "optim": optim_sd})
            else:
                sd = ModelOptimizerState(self.engine, full=False).state_dict()  # the shapes DCP loads into
                tree, tensors = split_tensors(sd["optim"])
                target = {"model": sd["model"], "optim": tensors}
                dcp_load(target, str(path / "dcp"))
                saved_tree = meta["optim"]
                problem = _kind_problem(tree, saved_tree)
                if problem:
                    raise UserError(f"checkpoint {path}: optimizer state {problem}")
                optim = join_tensors({k: saved_tree[k] for k in tree}, target["optim"])
                ModelOptimizerState(self.engine, full=False).load_state_dict({"model": target["model"],
                                                                              "optim": optim})
        except (UnsafeCheckpoint, *dcp_errors(), KeyError, ValueError, RuntimeError) as err:
            cause = _unwrap(err)
            if isinstance(cause, UnsafeCheckpoint):
                raise UserError(f"checkpoint {path}: {cause}") from None
            raise UserError(f"checkpoint {path} cannot be loaded into this model: {_why(cause)}") from None
        rng_file = path / f"rng-rank{self.ctx.rank}.json"
        same_layout = meta["world_size"] == self.ctx.world_size and meta["strategy"] == self.cfg.strategy
        restore = [(name, obj, meta.get(name)) for name, obj in self.stateful(**extra).items()]
        if rng_file.is_file() and same_layout:
            restore.append((rng_file.name, RNGState(), json.loads(rng_file.read_text())))
        for name, obj, state in restore:
            if state is None:
                continue
            # What the object's own state looks like; keys it would miss take their defaults (e.g. no "cuda"
            # RNG from a machine without CUDA).
            problem = _kind_problem(obj.state_dict(), state, every_key=False)
            if problem:
                raise UserError(f"checkpoint {path}: its {name} state: {problem}")
            try:
                obj.load_state_dict(state)
            except (TypeError, ValueError, KeyError, IndexError, AttributeError, OverflowError) as err:
                raise UserError(f"checkpoint {path}: its {name} state cannot be restored ({_why(err)})") from None
        if not same_layout and self.ctx.is_main:
            warn(f"resuming a {meta['strategy']} x{meta['world_size']} checkpoint as {self.cfg.strategy} "
                 f"x{self.ctx.world_size}: weights and optimizer are resharded; random streams start afresh")
        self._apply_changes(meta)
        run_id = (manifest.get("run") or {}).get("run_id")
        if manifest.get("run", {}).get("out") == self.out and isinstance(run_id, str) and run_id != self.run_id:
            self.run_id, self.known_run_id = run_id, True  # this run goes on under its id ...
            if self.recorder is not None:  # ... which the next resume finds in metrics.jsonl
                self.recorder.log("run", run_id=run_id)
        if manifest.get("run", {}).get("out") == self.out:
            self.saved.append(path)  # this run's last good checkpoint until it saves another
        return meta

    def _check_matches(self, path: Path, meta: dict[str, Any]) -> None:
        if meta["workload"] != self.cfg.workload:
            raise UserError(f"checkpoint {path} is from workload {meta['workload']}, not {self.cfg.workload}")
        mine = self.fingerprint()
        theirs = meta["fingerprint"]
        for name in sorted(set(mine) | set(theirs)):
            if name not in theirs:
                raise UserError(f"checkpoint {path} has no parameter {name}: it is from another model")
            if name not in mine:
                raise UserError(f"checkpoint {path} has parameter {name}, which this model does not")
            if mine[name] != theirs[name]:
                raise UserError(f"checkpoint {path}: parameter {name} has shape {theirs[name]}, "
                                f"this model's is {mine[name]}")
        saved = meta["settings"]
        loop = meta["loop"]
        if self.cfg.epochs is not None and loop["epoch"] >= self.cfg.epochs:
            done = (f"has trained into epoch {loop['epoch'] + 1}" if loop["step_in_epoch"]
                    else f"has finished {loop['epoch']} epochs")
            raise UserError(f"checkpoint {path} {done} (step {loop['global_step']}): --epochs {self.cfg.epochs} "
                            "leaves nothing to train; ask for more epochs")
        differ = [k for k in DATA_SETTINGS if k in saved and saved[k] != getattr(self.cfg, k, None)]
        if differ and not getattr(self.cfg, "allow_changes", False):
            listed = ", ".join(f"--{k.replace('_', '-')} {saved[k]} (now {getattr(self.cfg, k, None)})" for k in differ)
            raise UserError(f"checkpoint {path} was trained with {listed}: resume with the same settings, or "
                            "pass --allow-changes to continue with the new ones (the record lists them)")
        step = loop["global_step"]
        for k in differ + [k for k in APPLIED_SETTINGS if k in saved and saved[k] != getattr(self.cfg, k, None)]:
            self.changes[k] = {"from": saved[k], "to": getattr(self.cfg, k, None), "at_step": step}
        if differ and self.ctx.is_main:
            warn(f"resuming {path} with other settings: " + ", ".join(
                f"{k} {saved[k]} -> {getattr(self.cfg, k, None)}" for k in differ) + " (recorded in the record)")

    def _apply_changes(self, meta: dict[str, Any]) -> None:
        """A new --lr really trains: the optimizer's and the scheduler's base rates are scaled to it."""
        change = self.changes.get("lr")
        if not change or not change["from"] or change["to"] is None:
            return
        ratio = change["to"] / change["from"]
        for group in self.engine.optimizer.param_groups:
            group["lr"] = group["lr"] * ratio
            if "initial_lr" in group:
                group["initial_lr"] = group["initial_lr"] * ratio
        scheduler = self.engine.scheduler
        if scheduler is not None and hasattr(scheduler, "base_lrs"):
            scheduler.base_lrs = [lr * ratio for lr in scheduler.base_lrs]
            if hasattr(scheduler, "_last_lr"):
                scheduler._last_lr = [g["lr"] for g in self.engine.optimizer.param_groups]
        if self.ctx.is_main:
            warn(f"resuming with --lr {change['to']} instead of the checkpoint's {change['from']}: the optimizer "
                 f"trains on with the new rate from step {change['at_step']} (recorded in the record)")


def _kind_problem(current: Any, saved: Any, where: str = "", every_key: bool = True) -> str | None:
    """Where the saved JSON tree differs in kind from this optimizer's own (a string for a rate, a
    missing key (``every_key``), a tensor where a number belongs), or None: crafted values end here,
    not in a training step."""
    def kind(v: Any) -> str:
        if isinstance(v, bool):
            return "a boolean"
        if isinstance(v, (int, float)):
            return "a number"
        if isinstance(v, str):
            return "a string"
        if isinstance(v, list):
            return "a list"
        if isinstance(v, dict):
            return "a tensor" if set(v) == {"__tensor__"} else "a tuple" if set(v) == {"__tuple__"} else "an object"
        return "null" if v is None else type(v).__name__

    here = where or "(top)"
    if current is None:
        return None  # optional values (foreach, fused...) may be anything torch accepts there
    if kind(current) != kind(saved):
        return f"{here} is {kind(saved)}, not {kind(current)}"
    if isinstance(current, dict):
        if kind(current) == "a tensor":
            return None
        inner_cur = current.get("__tuple__", current)
        inner_saved = saved.get("__tuple__", saved)
        if isinstance(inner_cur, list):
            return _kind_problem(inner_cur, inner_saved, where, every_key)
        for key, value in inner_cur.items():
            if key not in inner_saved:
                if not every_key:
                    continue
                return f"has no {where + '.' if where else ''}{key}"
            problem = _kind_problem(value, inner_saved[key], f"{where}.{key}" if where else key, every_key)
            if problem:
                return problem
    elif isinstance(current, list) and current:  # (an empty list, e.g. no losses yet, says nothing of its items)
        same = len(current) == len(saved)
        for i, item in enumerate(saved):
            problem = _kind_problem(current[i] if same else current[0], item, f"{where}.{i}" if where else str(i),
                                    every_key)
            if problem:
                return problem
    return None


def _unwrap(err: BaseException) -> BaseException:
    """The first rank's own exception inside DCP's CheckpointException (else ``err``)."""
    failures = getattr(err, "failures", None) or getattr(err, "_failures", None)
    if isinstance(failures, dict):
        for wrapped in failures.values():
            inner = getattr(wrapped, "exc", None) or (wrapped[0] if isinstance(wrapped, tuple) else None)
            if isinstance(inner, BaseException):
                return _unwrap(inner)
    return err


def _why(err: BaseException) -> str:
    """One line for a failure to write, whatever its type (an OSError by its strerror, as before)."""
    err = _unwrap(err)
    if isinstance(err, OSError) and err.strerror:
        return " ".join(err.strerror.split())
    text = " ".join(str(err).split())
    if len(text) > 300:
        text = text[:300] + "..."
    return f"{type(err).__name__}: {text}" if text else type(err).__name__


def resume_hint(cfg) -> str:
    """What a stopped job's user can do next, from what is on disk: a checkpoint of this --out or none."""
    directory = Path(cfg.checkpoint_dir or Path(cfg.out) / "checkpoints")
    out = os.path.realpath(cfg.out)
    for _, path in candidates(directory):
        manifest, problem = read_manifest(path)
        if problem is None and (manifest.get("run") or {}).get("out") == out:  # (not hashed here: --resume does)
            return f"; checkpoint {path}; to continue, run the same command with --resume auto"
    return "; no checkpoint was saved: a new run starts from the beginning"
