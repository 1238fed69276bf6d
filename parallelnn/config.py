"""RunConfig: every knob of a run in one typed dataclass, validated once.

Each field carries its own one-line help, and the ``run`` verb's command-line options are generated
from these fields (``--batch-size`` sets ``batch_size``), so the documentation cannot drift from the
code. A TOML file (``--config run.toml``) may set any field; flags given on the command line win.

Fields left ``None`` take the workload's default (for example MNIST's 10 epochs) when the workload
is built; :func:`validate` checks everything that can be checked without building it.
"""

from __future__ import annotations

import dataclasses
import difflib
import os
import tomllib
from dataclasses import dataclass, field
from typing import Any

from parallelnn.errors import UserError

# Environment shared between the command a user typed and the ranks it starts.
T0_ENV = "PARALLELNN_T0"  # when the user pressed enter (start-up time is measured from it)
SPAWNED_ENV = "PARALLELNN_SPAWNED"  # set in ranks that `run --nproc N` spawned: the parent prints the summary
QUIET_CPP_ENV = "PARALLELNN_QUIET_CPP"  # the CLI set TORCH_CPP_LOG_LEVEL for itself only

DEVICES = ("auto", "cpu", "cuda", "mps")
LOADERS = ("memory", "dataloader")
SCHEDULES = ("gpipe", "1f1b", "interleaved-1f1b")
PRECISIONS = ("fp32", "bf16", "fp16")
REDUCE_PRECISIONS = ("fp32", "bf16")
BACKENDS = ("gloo", "nccl")


def opt(default: Any = None, help: str = "", **cli: Any) -> Any:
    """A config field with its help text and any extra argparse settings (choices, metavar, flag)."""
    return field(default=default, metadata={"help": help, **cli})


@dataclass
class RunConfig:
    # --- what and where -------------------------------------------------------------------------
    workload: str = opt(None, "what to train: iris, mnist, gpt2, or your own FILE.py:FUNCTION / package.module:FUNCTION",
                        positional=True)
    strategy: str = opt("single", "how to spread training over processes")
    device: str = opt("auto", "auto picks cuda, then mps, then cpu", choices=DEVICES)
    # --- data -----------------------------------------------------------------------------------
    data: str | None = opt(None, "user data: iris CSV; MNIST IDX directory; gpt2 CSV/JSONL/Parquet", metavar="PATH")
    download: bool = opt(False, "mnist: fetch the official MNIST files into the cache (SHA-256 checked)", flag=True)
    limit: int | None = opt(None, "use only the first N training samples (more than exist: warning, all used)", metavar="N")
    loader: str = opt("memory", "memory: pre-normalized tensors on the device; dataloader: DataLoader + workers",
                      choices=LOADERS)
    workers: int = opt(0, "dataloader worker processes (the study's 'threading')", metavar="N")
    threads: int | None = opt(None, "torch intra-op threads per process (default: cores / local processes)", metavar="N")
    bind_cores: bool = opt(True, "cpu, several processes on a machine: each computes on its own share of the cores",
                           negatable=True)
    # --- optimisation ---------------------------------------------------------------------------
    epochs: int | None = opt(None, "passes over the training split (default: the workload's)", metavar="N")
    batch_size: int | None = opt(None, "global batch size, shared by all data-parallel ranks", metavar="N")
    lr: float | None = opt(None, "learning rate (default: the workload's)", metavar="LR")
    seed: int = opt(0, "seed for weights, data order and splits", metavar="N")
    precision: str = opt("fp32", "autocast precision for the forward pass", choices=PRECISIONS)
    reduce_precision: str = opt("fp32", "fsdp/hybrid with --precision bf16: the dtype gradients are reduced in "
                                "(FSDP2 MixedPrecisionPolicy.reduce_dtype)", choices=REDUCE_PRECISIONS)
    tf32: bool = opt(False, "CUDA: let fp32 matrix multiplies and convolutions use TF32 tensor cores (MFU is then "
                     "measured against the TF32 peak)", flag=True)
    compile: bool = opt(False, "torch.compile the model (the first step compiles: see first_step_seconds)", flag=True)
    cuda_graph: bool = opt(False, "single on CUDA: capture the whole training step (forward, backward, optimizer) "
                           "in a CUDA graph and replay it; the uneven last batch runs eagerly", flag=True)
    activation_checkpointing: bool = opt(False, "recompute each block's activations in backward instead of "
                                         "keeping them (the workload's blocks: gpt2's transformer layers)", flag=True)
    grad_accum: int = opt(1, "split each per-rank batch into this many accumulation chunks", metavar="N")
    max_grad_norm: float | None = opt(None, "clip gradients to this norm (default: the workload's; 0 = off)",
                                      metavar="X")
    warmup_steps: int | None = opt(None, "gpt2: linear warm-up steps before cosine decay (default 5%% of steps)",
                                   metavar="N")
    # --- logging and evaluation -------------------------------------------------------------------
    out: str | None = opt(None, "run directory (default runs/<UTC time>-<workload>-<strategy>)", metavar="DIR")
    overwrite: bool = opt(False, "replace a record already in --out", flag=True)
    quiet: bool = opt(False, "no progress output", flag=True)
    log_every: int | None = opt(None, "write train metrics every N steps; 0: per epoch only (default: the "
                                "workload's)", metavar="N")
    eval_every: int | None = opt(None, "evaluate every N steps as well as after each epoch", metavar="N")
    baseline: str | None = opt(None, "single-process record.json to compute speedup/efficiency against",
                               metavar="RECORD")
    tensorboard: bool = opt(False, "also write TensorBoard event files (needs the tensorboard package)", flag=True)
    # --- distributed ------------------------------------------------------------------------------
    nproc: int = opt(1, "processes per node, started through torchrun", metavar="N")
    nnodes: int = opt(1, "machines taking part", metavar="N")
    node_rank: int = opt(0, "this machine's index among --nnodes", metavar="N")
    rdzv_endpoint: str | None = opt(None, "HOST:PORT of the rendezvous for multi-machine jobs", metavar="HOST:PORT")
    rdzv_timeout: float = opt(60.0, "seconds to wait for all machines to join the rendezvous", metavar="S")
    max_restarts: int = opt(0, "restart the ranks this many times after a failure (resumes from checkpoint)",
                            metavar="N")
    backend: str | None = opt(None, "process-group backend (default nccl on CUDA, gloo otherwise)", choices=BACKENDS)
    timeout: float = opt(300.0, "seconds a collective may wait for a peer before the job is ended", metavar="S")
    mesh: str | None = opt(None, "hybrid layout DPxTP or DPxPP, e.g. 2x2", metavar="AxB")
    hybrid: str = opt("tensor", "hybrid: what the second mesh dimension does", choices=("tensor", "pipeline"))
    reshard_after_forward: bool = opt(True, "fsdp: free gathered weights after forward (ZeRO-3)", negatable=True)
    schedule: str = opt("1f1b", "pipeline schedule", choices=SCHEDULES)
    microbatches: int | None = opt(None, "pipeline microbatches per batch (default: 2 per stage)", metavar="M")
    split: str | None = opt(None, "pipeline: layer indices where stages 2.. begin, e.g. 4,7", metavar="I,J")
    # --- gpt2 -------------------------------------------------------------------------------------
    model: str | None = opt(None, "gpt2: model name or directory (default: a small GPT-2 from scratch)",
                            metavar="NAME_OR_DIR")
    columns: str | None = opt(None, "gpt2: map fields, e.g. statement=title,input=io,solution=code",
                              metavar="MAP")
    template: str | None = opt(None, "gpt2: text template over {statement} {input} {solution}", metavar="TEXT")
    test_size: float = opt(0.1, "fraction of the data held out for evaluation", metavar="F")
    context: int | None = opt(None, "gpt2: tokens per training window (default: the model's, at most 256 "
                              "for the scratch model)", metavar="N")
    eval_pass_at_k: int | None = opt(None, "gpt2: after training, sample k completions per HumanEval-style test "
                                     "problem and run its tests in a sandboxed subprocess", metavar="K")
    # --- checkpoints ------------------------------------------------------------------------------
    checkpoint_every: int | None = opt(None, "save a checkpoint every N steps", metavar="N")
    checkpoint_dir: str | None = opt(None, "where checkpoints go (default OUT/checkpoints)", metavar="DIR")
    keep: int = opt(2, "complete checkpoints to keep", metavar="K")
    resume: str | None = opt(None, "'auto' (newest complete checkpoint) or a checkpoint path", metavar="auto|PATH")
    allow_changes: bool = opt(False, "--resume with another --seed/--limit/--batch-size/--data than the "
                              "checkpoint's (refused otherwise; the record lists the changes)", flag=True)

    # Filled in by the CLI, not by the user.
    command: str = field(default="", metadata={"internal": True})

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @property
    def world_size(self) -> int:
        return self.nproc * self.nnodes


def config_fields() -> list[dataclasses.Field]:
    return [f for f in dataclasses.fields(RunConfig) if not f.metadata.get("internal")]


FIELDS = {f.name: f for f in dataclasses.fields(RunConfig)}


def field_kind(f: dataclasses.Field) -> type:
    """The Python type a field holds (bool, int, float or str), from its annotation."""
    text = str(f.type)
    for kind in (bool, int, float):
        if kind.__name__ in text:
            return kind
    return str


def typed(name: str, value: Any, where: str) -> Any:
    """``value`` for field ``name`` if it has the field's type (ints are floats too), else a UserError."""
    f = FIELDS[name]
    kind = field_kind(f)
    ok = (isinstance(value, bool) if kind is bool else
          isinstance(value, int) and not isinstance(value, bool) if kind is int else
          isinstance(value, (int, float)) and not isinstance(value, bool) if kind is float else isinstance(value, str))
    if not ok:
        raise UserError(f"{where}: {name} must be {'true or false' if kind is bool else 'a ' + kind.__name__ if kind is not int else 'an int'}, "
                        f"got {value!r}")
    if f.metadata.get("choices") and value not in f.metadata["choices"]:
        raise UserError(f"{where}: {name} = {value!r} is not one of {', '.join(f.metadata['choices'])}")
    return float(value) if kind is float else value


def suggest(name: str, known: list[str] | set[str]) -> str:
    """"; did you mean X?" for the closest known name, or nothing."""
    close = difflib.get_close_matches(name, sorted(known), n=1, cutoff=0.6)
    return f"; did you mean {close[0]!r}?" if close else ""


def load_toml(path: str) -> dict[str, Any]:
    """Read a TOML file of RunConfig fields (dashes or underscores; at the top or under ``[run]``), each
    checked for its type; an unknown key or another section is refused, with the closest known name."""
    try:
        with open(path, "rb") as fh:
            raw = tomllib.load(fh)
    except FileNotFoundError:
        raise UserError(f"config file {path} does not exist") from None
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as err:
        raise UserError(f"cannot read config file {path}: {err}") from None
    items = {k: v for k, v in raw.items() if not isinstance(v, dict)}
    for key, value in raw.items():
        if isinstance(value, dict):
            if key != "run":
                raise UserError(f"config file {path}: section [{key}] is not supported: put options at the top "
                                "level or under [run]")
            items.update(value)
    known = {f.name for f in config_fields() if not f.metadata.get("positional")} | {"workload"}
    values = {}
    for key, value in items.items():
        name = key.replace("-", "_")
        if name not in known:
            raise UserError(f"config file {path}: unknown key '{key}'" + suggest(name, known))
        values[name] = typed(name, value, f"config file {path}")
    return values


def _positive(cfg: RunConfig, name: str, allow_zero: bool = False) -> None:
    value = getattr(cfg, name)
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise UserError(f"--{name.replace('_', '-')} must be a number, got {value!r}")
    if value < 0 or (value == 0 and not allow_zero):
        need = "zero or more" if allow_zero else "positive"
        raise UserError(f"--{name.replace('_', '-')} must be {need}, got {value}")


def validate(cfg: RunConfig, launching: bool = True) -> RunConfig:
    """Check every field that needs no model or data; raise UserError on the first problem. (The strategy
    and its layout are checked by :func:`parallelnn.parallel.resolve`.)

    ``launching=False`` for a rank of a job torchrun or srun started: the machines are already
    together, so the rendezvous options do not apply.
    """
    for name, allowed in (("device", DEVICES),
                          ("loader", LOADERS), ("schedule", SCHEDULES), ("precision", PRECISIONS)):
        value = getattr(cfg, name)
        if value not in allowed:
            raise UserError(f"unknown {name} '{value}': choose one of {', '.join(allowed)}")
    if cfg.backend is not None and cfg.backend not in BACKENDS:
        raise UserError(f"unknown backend '{cfg.backend}': choose one of {', '.join(BACKENDS)}")
    for name in ("epochs", "batch_size", "lr", "limit", "threads", "nproc", "nnodes", "grad_accum",
                 "eval_every", "microbatches", "checkpoint_every", "keep", "context",
                 "eval_pass_at_k", "timeout", "rdzv_timeout"):
        _positive(cfg, name)
    for name in ("workers", "max_restarts", "node_rank", "max_grad_norm", "warmup_steps", "log_every"):
        _positive(cfg, name, allow_zero=True)
    if not 0 < cfg.test_size < 1:
        raise UserError(f"--test-size must be between 0 and 1, got {cfg.test_size}")
    if launching and cfg.node_rank >= cfg.nnodes:
        raise UserError(f"--node-rank {cfg.node_rank} must be below --nnodes {cfg.nnodes}")
    if launching and cfg.nnodes > 1 and not cfg.rdzv_endpoint:
        raise UserError("--nnodes above 1 needs --rdzv-endpoint HOST:PORT (the same on every machine)")
    if cfg.rdzv_endpoint:
        host, _, port = cfg.rdzv_endpoint.rpartition(":")
        if not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise UserError(f"--rdzv-endpoint '{cfg.rdzv_endpoint}' must be HOST:PORT")
    if cfg.reduce_precision not in REDUCE_PRECISIONS:
        raise UserError(f"unknown reduce precision '{cfg.reduce_precision}': choose one of {', '.join(REDUCE_PRECISIONS)}")
    if cfg.reduce_precision != "fp32" and cfg.precision != "bf16":
        raise UserError("--reduce-precision applies with --precision bf16 (the parameters' dtype under FSDP)")
    if cfg.cuda_graph and cfg.compile:
        raise UserError("--cuda-graph and --compile are two ways of the same thing here: choose one")
    if cfg.cuda_graph and cfg.grad_accum > 1:
        raise UserError("--cuda-graph captures one forward and backward per step: it cannot take --grad-accum")
    if cfg.cuda_graph and cfg.precision == "fp16":
        raise UserError("--cuda-graph cannot take --precision fp16 (its loss scaler synchronises with the host); "
                        "use bf16")
    if cfg.loader == "memory" and cfg.workers:
        raise UserError("--workers applies to --loader dataloader (the memory loader has no workers)")
    if cfg.batch_size is not None and cfg.grad_accum > cfg.batch_size:
        raise UserError(f"--grad-accum {cfg.grad_accum} is larger than --batch-size {cfg.batch_size}")
    if cfg.resume and cfg.resume != "auto" and not os.path.exists(cfg.resume):
        raise UserError(f"--resume {cfg.resume}: no such checkpoint")
    if cfg.baseline and not os.path.isfile(cfg.baseline):
        raise UserError(f"--baseline {cfg.baseline}: no such record file")
    return cfg


def option_name(name: str) -> str:
    """A field's command-line option: ``batch_size`` -> ``--batch-size``."""
    return "--" + name.replace("_", "-")


def config_to_argv(cfg: RunConfig) -> list[str]:
    """The ``run`` arguments that reproduce ``cfg`` (fields at their defaults are left out)."""
    argv: list[str] = []
    for f in config_fields():
        value = getattr(cfg, f.name)
        if f.metadata.get("positional"):
            argv.insert(0, str(value))
        elif value == f.default:
            continue
        elif f.metadata.get("flag"):
            argv.append(option_name(f.name))
        elif f.metadata.get("negatable"):
            argv.append(option_name(f.name) if value else "--no-" + option_name(f.name)[2:])
        elif value is not None and str(value).startswith("-"):
            argv.append(f"{option_name(f.name)}={value}")  # one argument: '--out -x' would be two options
        elif value is not None:
            argv += [option_name(f.name), str(value)]
    return argv
