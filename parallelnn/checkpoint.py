"""Checkpoints: save everything a run needs to continue exactly, atomically; find the newest good one.

A checkpoint is a directory ``CHECKPOINT_DIR/step-000120/``:

* weights and optimizer state under the original model's parameter names (so another layout can
  load them): one process writes ``model.safetensors`` + ``optimizer.pt``; several processes write
  one ``torch.distributed.checkpoint`` (DCP) of both, each rank its own shards, so FSDP shards are
  saved and loaded without gathering, and DCP reshards when the number of ranks changes;
* ``rng-rank{R}.json``: every RNG state of every rank (python, numpy, torch CPU and CUDA);
* ``trainer.json``: step, epoch, position in the epoch, losses so far, LR scheduler, timings, and
  what model it belongs to (workload, parameter shapes) so a wrong resume is refused;
* ``MANIFEST.json``, written last: size and SHA-256 of every file.

It is written under ``.step-000120.partial`` and renamed when complete; a directory without a
manifest, or whose files do not match it, is not a checkpoint. Loading never unpickles: safetensors,
JSON, DCP, and ``torch.load(weights_only=True)`` for the optimizer's tensors and numbers.
The checkpoint directory must be shared by all machines of a multi-machine job.
"""

from __future__ import annotations

import errno
import json
import os
import random
import re
import shutil
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from parallelnn.errors import UserError, warn
from parallelnn.launch import agree
from parallelnn.record import atomic_write_json, sha256_file

MANIFEST = "MANIFEST.json"
STEP_DIR = re.compile(r"^step-(\d+)$")


def _barrier(ctx) -> None:
    if ctx.multi_rank:
        dist.barrier()


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


# -- finding and checking ------------------------------------------------------------------------------

def verify(path: Path) -> str | None:
    """Why ``path`` is not a complete, intact checkpoint, or None when it is."""
    manifest = path / MANIFEST
    if not manifest.is_file():
        return "no manifest (incomplete)"
    try:
        files = json.loads(manifest.read_text())["files"]
    except (OSError, ValueError, KeyError) as err:
        return f"unreadable manifest ({err})"
    for name, meta in files.items():
        f = path / name
        if not f.is_file():
            return f"{name} is missing"
        if f.stat().st_size != meta["size"]:
            return f"{name} has {f.stat().st_size} bytes, the manifest says {meta['size']}"
        if sha256_file(f) != meta["sha256"]:
            return f"{name} does not match its checksum"
    return None


def candidates(directory: Path) -> list[Path]:
    """Checkpoint directories, newest step first."""
    if not directory.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in directory.iterdir() if (m := STEP_DIR.match(p.name)) and p.is_dir()]
    return [p for _, p in sorted(found, reverse=True)]


def find_newest_good(directory: Path) -> Path | None:
    """The newest checkpoint that verifies; each bad one met on the way is named in a warning."""
    for path in candidates(directory):
        problem = verify(path)
        if problem is None:
            return path
        warn(f"skipping checkpoint {path}: {problem}")
    return None


# -- the checkpointer ----------------------------------------------------------------------------------

class Checkpointer:
    """Saves and restores one run's checkpoints (every rank has one; rank 0 does the file keeping)."""

    def __init__(self, cfg, ctx, engine, built, directory: Path):
        self.cfg, self.ctx, self.engine, self.built = cfg, ctx, engine, built
        self.directory = directory
        self.saved: list[Path] = []
        self.fault_step: int | None = None  # tests: make the save at this step fail as a full disk would

    def check_writable(self) -> None:
        """Fail before training, not at the first save, when checkpoints cannot be written."""
        if self.ctx.is_main:
            try:
                self.directory.mkdir(parents=True, exist_ok=True)
                probe = self.directory / f".write-test-{os.getpid()}"
                probe.write_text("")
                probe.unlink()
            except OSError as err:
                raise UserError(f"--checkpoint-dir {self.directory} is not writable: {err.strerror or err}")
        _barrier(self.ctx)

    def fingerprint(self) -> dict[str, list[int]]:
        return {k: list(v.shape) for k, v in self.built.model.state_dict().items()}

    # -- saving ----------------------------------------------------------------------------------------
    def save(self, trainer) -> Path | None:
        """Checkpoint the trainer's current state; on failure (e.g. disk full) keep the previous one."""
        step = trainer.state.global_step
        final = self.directory / f"step-{step:09d}"
        partial = self.directory / f".step-{step:09d}.partial"
        ok = True
        try:
            if self.ctx.is_main:
                shutil.rmtree(partial, ignore_errors=True)
                partial.mkdir(parents=True)
            _barrier(self.ctx)
            self._write(trainer, partial, step)
        except OSError as err:
            ok = False
            warn(f"checkpoint at step {step} not saved ({err.strerror or err}); the previous one is kept")
        ok = self._all_ok(ok)
        if ok and self.ctx.is_main:
            files = {str(p.relative_to(partial)): {"size": p.stat().st_size, "sha256": sha256_file(p)}
                     for p in sorted(partial.rglob("*")) if p.is_file()}
            try:
                atomic_write_json(partial / MANIFEST, {"step": step, "files": files})
                shutil.rmtree(final, ignore_errors=True)
                os.replace(partial, final)
            except OSError as err:
                ok = False
                warn(f"checkpoint at step {step} not completed ({err.strerror or err}); the previous one is kept")
        if not ok and self.ctx.is_main:
            shutil.rmtree(partial, ignore_errors=True)
        ok = self._all_ok(ok)
        if not ok:
            return None
        self.saved.append(final)
        if self.ctx.is_main:
            self._prune()
        return final

    def _all_ok(self, ok: bool) -> bool:
        if not self.ctx.multi_rank:
            return ok
        flag = torch.tensor([0 if ok else 1], dtype=torch.int32, device=self.ctx.device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return int(flag.item()) == 0

    def _write(self, trainer, directory: Path, step: int) -> None:
        distributed = self.ctx.multi_rank
        model_sd, optim_sd = self.engine.checkpoint_state(full=not distributed)
        if distributed:
            import torch.distributed.checkpoint as dcp

            dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=str(directory / "dcp"))
        else:
            from safetensors.torch import save_file

            save_file({k: v.detach().cpu().contiguous().clone() for k, v in model_sd.items()},
                      str(directory / "model.safetensors"))
            if self.fault_step == step:
                raise OSError(errno.ENOSPC, "No space left on device (injected)")
            torch.save(optim_sd, directory / "optimizer.pt")
        with open(directory / f"rng-rank{self.ctx.rank}.json", "w") as fh:
            json.dump(rng_state(), fh)
        if self.fault_step == step:
            raise OSError(errno.ENOSPC, "No space left on device (injected)")
        if self.ctx.is_main:
            atomic_write_json(directory / "trainer.json", {
                "workload": self.cfg.workload, "dataset": self.built.dataset, "strategy": self.cfg.strategy,
                "world_size": self.ctx.world_size, "batch_size": self.cfg.batch_size, "seed": self.cfg.seed,
                "fingerprint": self.fingerprint(), "loop": trainer.loop_state(),
                "scheduler": self.engine.scheduler.state_dict() if self.engine.scheduler is not None else None,
                "scaler": self.engine.scaler.state_dict() if self.engine.scaler is not None else None,
            })

    def _prune(self) -> None:
        for old in candidates(self.directory)[self.cfg.keep:]:
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
                path = find_newest_good(self.directory)
        path, error = agree((path, error), self.ctx)
        if error:
            raise UserError(error)
        return path

    def load(self, path: Path, trainer) -> dict[str, Any]:
        meta = json.loads((path / "trainer.json").read_text())
        self._check_matches(path, meta)
        dcp_dir = path / "dcp"
        if dcp_dir.is_dir():
            import torch.distributed.checkpoint as dcp

            model_sd, optim_sd = self.engine.checkpoint_state(full=False)  # the shapes DCP loads into
            state = {"model": model_sd, "optim": optim_sd}
            with warnings.catch_warnings():  # "assuming the intent is to load in a single process": it is
                warnings.filterwarnings("ignore", message=".*single process")
                dcp.load(state, checkpoint_id=str(dcp_dir))
            model_sd, optim_sd = state["model"], state["optim"]
            full = False
        else:
            from safetensors.torch import load_file

            model_sd = load_file(str(path / "model.safetensors"))
            optim_sd = torch.load(path / "optimizer.pt", weights_only=True, map_location="cpu")
            full = True
        self.engine.load_checkpoint_state(model_sd, optim_sd, full=full)
        if meta.get("scheduler") is not None and self.engine.scheduler is not None:
            self.engine.scheduler.load_state_dict(meta["scheduler"])
        if meta.get("scaler") is not None and self.engine.scaler is not None:
            self.engine.scaler.load_state_dict(meta["scaler"])
        rng_file = path / f"rng-rank{self.ctx.rank}.json"
        same_layout = meta["world_size"] == self.ctx.world_size and meta["strategy"] == self.cfg.strategy
        if rng_file.is_file() and same_layout:
            set_rng_state(json.loads(rng_file.read_text()))
        elif not same_layout and self.ctx.is_main:
            warn(f"resuming a {meta['strategy']} x{meta['world_size']} checkpoint as {self.cfg.strategy} "
                 f"x{self.ctx.world_size}: weights and optimizer are resharded; random streams start afresh")
        trainer.restore_loop_state(meta["loop"])
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
        if meta.get("batch_size") != self.cfg.batch_size:
            warn(f"checkpoint {path} was trained with batch size {meta.get('batch_size')}, now {self.cfg.batch_size}: "
                 "the position in the epoch is kept in steps")
