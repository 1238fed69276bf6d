"""Engine: the one object the trainer drives, whatever strategy built it.

A strategy wraps the model with a torch.distributed building block and returns an Engine that says
* how to run one training step (``train_step``) and one evaluation forward (``eval_step``);
* which share of each global batch this rank loads (``dp_rank`` of ``dp_size``);
* whether this rank's outputs and losses count towards totals (``counts_outputs``): e.g. only the
  last pipeline stage sees outputs, and of tensor-parallel ranks holding identical outputs only one
  counts.

Loss scaling: workloads return the *sum* of per-sample losses; ``train_step`` back-propagates
``sum * scale`` with ``scale = dp_size / global_batch``. Data-parallel gradient averaging (DDP's
all-reduce, FSDP's reduce-scatter, both divide by ``dp_size``) then yields exactly the gradient of
the mean loss over the global batch — however the batch was split over ranks, accumulation chunks
or pipeline microbatches, and even when the last batch of an epoch splits unevenly.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

AUTOCAST = {"bf16": torch.bfloat16, "fp16": torch.float16}


def _by_layout(tensors) -> list[list[torch.Tensor]]:
    """Tensors grouped so that each group is all plain tensors or all DTensors on one mesh."""
    from torch.distributed.tensor import DTensor

    groups: dict[Any, list[torch.Tensor]] = {}
    for t in tensors:
        groups.setdefault(t.device_mesh if isinstance(t, DTensor) else None, []).append(t)
    return list(groups.values())


def total_grad_norm(parameters, group=None) -> torch.Tensor:
    """L2 norm of all gradients, correct for plain tensors and DTensors (FSDP/TP shards) alike.

    ``group``: a process group whose ranks hold *different* parameters (pipeline stages); their
    squared norms are summed.
    """
    from torch.distributed.tensor import DTensor

    grads = [p.grad for p in parameters if p.grad is not None]
    squared = None
    for group_grads in _by_layout(grads):
        norm = torch.nn.utils.get_total_norm(group_grads)
        if isinstance(norm, DTensor):
            norm = norm.full_tensor()
        squared = norm.float() ** 2 if squared is None else squared + norm.float() ** 2
    if squared is None:
        squared = torch.zeros((), device=grads[0].device if grads else "cpu")
    if group is not None:
        import torch.distributed as dist

        dist.all_reduce(squared, group=group)
    return squared.sqrt()


def blocks_of(model: nn.Module, workload) -> list[nn.Module]:
    """A model's repeated blocks: the workload's ``blocks``; else its pipeline ``layers`` that hold parameters;
    else the entries of the model's largest ``nn.ModuleList`` (a transformer's layers); else none. FSDP shards
    them one by one, activation checkpointing recomputes them."""
    if workload.blocks is not None:
        return list(workload.blocks(model))
    if workload.layers is not None:
        return [m for m in workload.layers(model) if any(True for _ in m.parameters())]
    lists = [m for m in model.modules() if isinstance(m, nn.ModuleList) and len(m)]
    return list(max(lists, key=len)) if lists else []


def checkpoint_blocks(blocks: list[nn.Module]) -> int:
    """Activation checkpointing per block: each block's forward runs under ``torch.utils.checkpoint``
    (non-reentrant), so backward recomputes its activations instead of keeping them. The forward is
    replaced on the instance, not wrapped in another module: parameter names, state dicts and checkpoints
    stay the model's own, and FSDP, tensor plans and pipeline splits see the same modules."""
    from torch.utils.checkpoint import checkpoint

    for block in blocks:
        def forward(*args, _forward=block.forward, **kwargs):
            return checkpoint(_forward, *args, use_reentrant=False, **kwargs)

        block.forward = forward
    return len(blocks)


def contiguous_layout(model: nn.Module) -> nn.Module:
    """Undo a channels_last layout the workload chose for speed: FSDP2 shards only contiguous
    parameters, and pipeline stages send only contiguous activations."""
    return model.to(memory_format=torch.contiguous_format)


class Engine:
    """Forward, backward and optimizer step of a model that runs whole on this rank (possibly wrapped)."""

    def __init__(self, module: nn.Module, workload, cfg, device: torch.device, total_steps: int, *,
                 dp_rank: int = 0, dp_size: int = 1, counts_outputs: bool = True,
                 no_sync: Callable[[], Any] | None = None, norm_group=None, describe: dict | None = None,
                 autocast: bool = True, compile_modules: list[nn.Module] | None = None):
        """``autocast=False``: the strategy casts itself (FSDP2's MixedPrecisionPolicy), the engine must not.
        ``--compile`` compiles the forward of each of ``compile_modules`` (default: the module) in place, so that
        parameter names and state dicts do not change and module hooks (FSDP's gathers, DDP's) stay outside the
        graphs. (``Module.compile()`` is not used: in torch 2.13 it leaves the module uncompiled.)"""
        self.module = module
        self.loss_fn = workload.loss
        self.device = device
        self.dp_rank, self.dp_size = dp_rank, dp_size
        self.counts_outputs = counts_outputs
        self.optimizer, self.scheduler = workload.optimizer(module.parameters(), cfg.lr, total_steps)
        self.grad_accum = cfg.grad_accum
        self.max_grad_norm = cfg.max_grad_norm or 0.0
        self.track_grad_norm = workload.track_grad_norm or self.max_grad_norm > 0
        self.autocast_dtype = AUTOCAST.get(cfg.precision) if autocast else None
        self.scaler = torch.amp.GradScaler(device.type) if cfg.precision == "fp16" else None
        self._no_sync = no_sync or contextlib.nullcontext
        self.norm_group = norm_group
        # What the strategy did, for the record (e.g. which layers stayed replicated).
        self.describe = describe or {}
        if getattr(cfg, "compile", False):
            for m in compile_modules or [module]:
                m.forward = torch.compile(m.forward)
            self.describe["compiled_modules"] = len(compile_modules or [module])

    # -- helpers ---------------------------------------------------------------------------------
    def autocast(self):
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.autocast_dtype)

    def parameters(self):
        return [p for group in self.optimizer.param_groups for p in group["params"]]

    def norm_parameters(self):
        """The parameters whose gradients count in the gradient norm (each counted once job-wide)."""
        return self.parameters()

    def _sync_gradients(self) -> None:
        """Gradient communication the wrapper does not do itself (none, but for tied pipeline weights)."""

    def _step_optimizer(self) -> torch.Tensor | None:
        norm = None
        if self.scaler is not None:
            self.scaler.unscale_(self.optimizer)
        self._sync_gradients()
        if self.track_grad_norm:
            norm = total_grad_norm(self.norm_parameters(), self.norm_group)
            if self.max_grad_norm > 0:
                for group in _by_layout(self.parameters()):  # foreach kernels take one tensor kind
                    torch.nn.utils.clip_grads_with_norm_(group, self.max_grad_norm, norm)
        if self.scaler is not None:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        if self.scheduler is not None:
            self.scheduler.step()
        return norm

    def _backward(self, loss: torch.Tensor) -> None:
        (self.scaler.scale(loss) if self.scaler is not None else loss).backward()

    # -- the interface the trainer uses -------------------------------------------------------------
    def train_step(self, x: torch.Tensor, y: torch.Tensor, scale: float) -> tuple[torch.Tensor, torch.Tensor | None]:
        """One optimizer step on this rank's share of a global batch; returns (summed loss, grad norm)."""
        self.optimizer.zero_grad(set_to_none=True)
        chunks = list(zip(x.tensor_split(self.grad_accum), y.tensor_split(self.grad_accum)))
        total = torch.zeros((), device=self.device)
        for i, (xc, yc) in enumerate(chunks):
            last = i == len(chunks) - 1
            with (contextlib.nullcontext() if last else self._no_sync()):
                with self.autocast():
                    out = self.module(xc)
                loss = self.loss_fn(out, yc)
                self._backward(loss * scale)
            total += loss.detach()
        return total, self._step_optimizer()

    @torch.no_grad()
    def eval_step(self, x: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor | None:
        with self.autocast():
            return self.module(x)

    def full_state_dict(self) -> dict[str, torch.Tensor]:
        """The whole model's weights under the original model's names, on CPU (every rank must call
        it when distributed: it gathers shards)."""
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

            state = get_model_state_dict(self.module, options=StateDictOptions(full_state_dict=True))
        else:
            state = self.module.state_dict()
        return {k: v.detach().cpu() for k, v in state.items()}

    # -- checkpoints ----------------------------------------------------------------------------------
    @staticmethod
    def _state_options(full: bool):
        """``full``: whole tensors, optimizer state nested (a single-process checkpoint); else shards as
        they lie, optimizer state flattened to one key per parameter and value (for DCP, and so that
        ranks holding different parameters, like pipeline stages, never write the same key)."""
        from torch.distributed.checkpoint.state_dict import StateDictOptions

        return StateDictOptions(full_state_dict=full, flatten_optimizer_state_dict=not full)

    def checkpoint_state(self, full: bool = False) -> tuple[dict[str, Any], dict[str, Any]]:
        """(model, optimizer) state under the model's parameter names."""
        from torch.distributed.checkpoint.state_dict import get_state_dict

        return get_state_dict(self.module, self.optimizer, options=self._state_options(full))

    def load_checkpoint_state(self, model_sd: dict[str, Any], optim_sd: dict[str, Any], full: bool) -> None:
        """Inverse of :meth:`checkpoint_state`; a full state is sharded here as this engine's layout needs."""
        from torch.distributed.checkpoint.state_dict import set_state_dict

        set_state_dict(self.module, self.optimizer, model_state_dict=model_sd, optim_state_dict=optim_sd,
                       options=self._state_options(full))

    def train(self, mode: bool = True) -> None:
        self.module.train(mode)

    def lr(self) -> float:
        return float(self.optimizer.param_groups[0]["lr"])


class CudaGraphs:
    """CUDA graph capture as :class:`GraphedEngine` uses it (a test substitutes an eager stand-in on CPU)."""

    #: The optimizer must keep its step counts on the device (``capturable``) to be captured.
    capturable = True

    def __init__(self, device: torch.device):
        self.device = device

    @contextlib.contextmanager
    def side_stream(self):
        """Warm-up steps run on a side stream (what ``torch.cuda.graphs`` asks before a capture)."""
        stream = torch.cuda.Stream(self.device)
        stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(stream):
            yield
        torch.cuda.current_stream(self.device).wait_stream(stream)

    def capture(self, fn: Callable[[], Any]) -> tuple[Callable[[], None], Any]:
        """(replay, the outputs ``fn`` returned while captured): the captured work has not run yet."""
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = fn()
        return graph.replay, out


class GraphedEngine(Engine):
    """The whole training step (forward, backward, gradient clipping, optimizer) captured once in a CUDA
    graph and replayed for every full batch: one launch per step instead of hundreds, no host work.

    * The first ``WARMUP_STEPS`` steps run eagerly (on a side stream): they are real training steps.
    * The next full batch is copied into static input buffers and the step captured, then replayed; every
      later batch of that shape is copied into the same buffers and replayed. The loss (and gradient norm)
      are cloned out of the graph's static outputs, so a step's value is never overwritten by the next.
    * A batch of another shape or loss scale (the uneven last batch of an epoch) runs eagerly, outside the
      graph, on the same parameters, gradients and optimizer state: losses stay exact.
    * The optimizer keeps its state on the device (``capturable``); its learning rate must be constant
      (a Python float is baked into the graph), so a workload with an LR schedule is refused.
    """

    WARMUP_STEPS = 3

    def __init__(self, *args, graphs=None, **kwargs):
        super().__init__(*args, **kwargs)
        from parallelnn.errors import UserError

        if self.scheduler is not None:
            raise UserError("--cuda-graph needs a constant learning rate, but this workload's optimizer has an LR "
                            "schedule (use --compile instead)")
        self.graphs = graphs or CudaGraphs(self.device)
        if self.graphs.capturable:
            for group in self.optimizer.param_groups:
                if "capturable" in group:  # Adam, AdamW, ...: step counts kept on the device
                    group["capturable"] = True
                elif not isinstance(self.optimizer, torch.optim.SGD):  # SGD keeps no counts: capturable as is
                    raise UserError(f"--cuda-graph needs an optimizer that can be captured (Adam, AdamW, SGD...): "
                                    f"{type(self.optimizer).__name__} cannot")
        self._eager_steps = 0
        self._replay: Callable[[], None] | None = None
        self._static: tuple[torch.Tensor, torch.Tensor, float] | None = None
        self._outputs: tuple[torch.Tensor, torch.Tensor | None] | None = None
        self.describe["cuda_graph"] = True

    def autocast(self):
        # Autocast's cache of cast weights must not outlive a capture (torch.cuda.graphs' own advice).
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.autocast_dtype, cache_enabled=False)

    def _step(self, x: torch.Tensor, y: torch.Tensor, scale: float, set_to_none: bool):
        self.optimizer.zero_grad(set_to_none=set_to_none)
        with self.autocast():
            out = self.module(x)
        loss = self.loss_fn(out, y)
        self._backward(loss * scale)
        return loss.detach(), self._step_optimizer()

    def _fits(self, x: torch.Tensor, y: torch.Tensor, scale: float) -> bool:
        sx, sy, sscale = self._static
        return x.shape == sx.shape and y.shape == sy.shape and scale == sscale

    def train_step(self, x: torch.Tensor, y: torch.Tensor, scale: float) -> tuple[torch.Tensor, torch.Tensor | None]:
        if self._replay is not None and self._fits(x, y, scale):
            sx, sy, _ = self._static
            sx.copy_(x)
            sy.copy_(y)
            self._replay()
            return self._cloned()
        if self._replay is None and self._eager_steps >= self.WARMUP_STEPS:
            self._static = (x.clone(), y.clone(), scale)
            # Gradients allocated inside the capture: later replays write (not add) them in place.
            self.optimizer.zero_grad(set_to_none=True)
            self._replay, self._outputs = self.graphs.capture(
                lambda: self._step(self._static[0], self._static[1], scale, set_to_none=False))
            self._replay()
            return self._cloned()
        # Warm-up, or a batch the graph does not fit: eagerly, into the same gradient tensors once captured.
        with self.graphs.side_stream() if self._replay is None else contextlib.nullcontext():
            loss, norm = self._step(x, y, scale, set_to_none=self._replay is None)
        self._eager_steps += 1
        return loss, norm

    def _cloned(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        loss, norm = self._outputs
        return loss.clone(), (norm.clone() if norm is not None else None)
