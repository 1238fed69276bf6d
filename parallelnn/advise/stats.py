"""What the cost model needs to know about a model, measured on the real one (on the CPU, a few samples).

Parameters and their bytes; forward+backward FLOPs per sample (``torch.utils.flop_counter``); activation
bytes saved for backward per sample (``saved_tensors_hooks``, at two batch sizes: the slope is per sample);
the layers a pipeline can split, the largest one (FSDP gathers one block at a time) and the activation
passed between consecutive layers; what a tensor-parallel plan shards and all-reduces per sample.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import nn

from parallelnn import measure


def _params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def saved_activation_bytes(model: nn.Module, loss, x: torch.Tensor, y: torch.Tensor,
                           marked: list[nn.Module] = ()) -> tuple[int, int]:
    """(peak bytes of tensors autograd keeps for backward during one forward + backward of ``(x, y)``,
    not counting parameters; of those, the bytes first saved inside the ``marked`` modules)."""
    probe = measure.TensorBytes(step=1)
    handles = []
    for m in marked:
        handles.append(m.register_forward_pre_hook(lambda *_: setattr(probe, "depth", probe.depth + 1)))
        handles.append(m.register_forward_hook(lambda *_: setattr(probe, "depth", probe.depth - 1)))
    probe.start(list(model.parameters()))
    try:
        loss(model(x), y).backward()
    finally:
        peak = probe.stop()
        for h in handles:
            h.remove()
    model.zero_grad(set_to_none=True)
    return peak, probe.inside


def _batch(split, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    sample = split.head(min(n, len(split)))
    return sample.prepare(sample.inputs), sample.targets


def _output_bytes(modules: list[nn.Module], run) -> list[int]:
    """Bytes of each module's output during ``run()`` (summed over calls)."""
    sizes = [0] * len(modules)
    handles = []
    for i, m in enumerate(modules):
        def hook(_m, _inp, out, i=i):
            if isinstance(out, torch.Tensor):
                sizes[i] += out.numel() * out.element_size()
        handles.append(m.register_forward_hook(hook))
    try:
        with torch.no_grad():
            run()
    finally:
        for h in handles:
            h.remove()
    return sizes


def model_stats(workload, batch: int = 8) -> dict[str, Any]:
    """The figures the cost model reads (``parallelnn.advise.costs.ModelStats``'s fields), for ``workload``."""
    model = copy.deepcopy(workload.model)  # measuring leaves gradients and hooks behind: not on the run's model
    x, y = _batch(workload.train, batch)
    n = len(x)
    half = max(1, n // 2)
    small, _ = saved_activation_bytes(model, workload.loss, x[:half], y[:half])
    full, _ = saved_activation_bytes(model, workload.loss, x, y)
    per_sample = (full - small) / (n - half) if n > half else full / n
    layers = workload.layers(model) if workload.layers is not None else [
        m for m in model.children() if _params(m)] or [model]
    boundaries = _output_bytes(layers, lambda: model(x[:1])) if workload.layers is not None else [0]
    stats = {
        "parameters": _params(model),
        "parameter_bytes": sum(p.numel() * p.element_size() for p in model.parameters()),
        "flops_per_sample": measure.flops_per_sample(model, workload.loss, x, y),
        "activation_bytes_per_sample": max(per_sample, 0.0),
        "layers": len(layers),
        "largest_layer_parameters": max(_params(m) for m in layers),
        "boundary_bytes_per_sample": float(max(boundaries[:-1] or boundaries)),
        "tokens_per_sample": workload.tokens_per_sample,
        **tensor_parallel_figures(workload, model, x, y),
    }
    return stats


def tensor_parallel_figures(workload, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> dict[str, float]:
    """What a tensor-parallel plan divides: the share of the parameters, of the FLOPs and of the saved
    activations that are in the layers it shards, and the bytes its row-wise layers all-reduce per sample in
    a forward (the backward all-reduces as much at the column-wise layers' inputs)."""
    from torch.utils.flop_counter import FlopCounterMode

    from parallelnn.errors import UserError
    from parallelnn.parallel.tensor import plan_of

    try:
        sharded, reduced = plan_of(workload).layers(model)
    except (UserError, AttributeError, NotImplementedError):
        return {"tp_sharded_fraction": 0.0, "tp_allreduce_bytes_per_sample": 0.0}
    total = _params(model) or 1
    reduced_bytes = sum(_output_bytes(reduced, lambda: model(x[:1])))
    all_saved, inside = saved_activation_bytes(model, workload.loss, x, y, sharded)
    with FlopCounterMode(display=False) as counter:
        workload.loss(model(x), y).backward()
    model.zero_grad(set_to_none=True)
    by_module = counter.get_flop_counts()
    names = {id(m): n for n, m in model.named_modules()}
    root = type(model).__name__
    in_sharded = sum(sum(by_module.get(f"{root}.{names[id(m)]}", {}).values()) for m in sharded)
    return {"tp_sharded_fraction": sum(_params(m) for m in sharded) / total,
            "tp_sharded_flops_fraction": in_sharded / max(counter.get_total_flops(), 1),
            "tp_sharded_activation_fraction": inside / all_saved if all_saved else 0.0,
            "tp_allreduce_bytes_per_sample": float(reduced_bytes), "tp_allreduce_calls": len(reduced)}
