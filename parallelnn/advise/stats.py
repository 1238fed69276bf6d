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
from parallelnn.parallel.engine import blocks_of


def _params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def saved_activation_bytes(model: nn.Module, loss, x: torch.Tensor, y: torch.Tensor, opens: list[nn.Module] = (),
                           closes: list[nn.Module] = ()) -> tuple[int, int]:
    """(peak bytes of tensors autograd keeps for backward during one forward + backward of ``(x, y)``, not
    counting parameters or the batch; of those, the bytes first saved between the output of an ``opens``
    module and the output of a ``closes`` module: a tensor-parallel pair's sharded activations)."""
    probe = measure.TensorBytes(step=1)
    handles = [m.register_forward_hook(lambda *_: setattr(probe, "region", 1)) for m in opens]
    handles += [m.register_forward_hook(lambda *_: setattr(probe, "region", 0)) for m in closes]
    probe.start([*model.parameters(), x, y])  # the batch is data, as the trainer's count takes it
    try:
        loss(model(x), y).backward()
    finally:
        peak = probe.stop()
        for h in handles:
            h.remove()
    model.zero_grad(set_to_none=True)
    return peak, probe.by_region.get(1, 0)


def _batch(split, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    sample = split.head(min(n, len(split)))
    return sample.prepare(sample.inputs), sample.targets


def _hooked_bytes(modules: list[nn.Module], run, pick) -> list[int]:
    """Bytes of the tensor ``pick(inputs, output)`` chooses at each call of each module during ``run()``
    (summed over calls; None or a non-tensor: nothing)."""
    sizes = [0] * len(modules)
    handles = []
    for i, m in enumerate(modules):
        def hook(_m, inp, out, i=i):
            t = pick(inp, out)
            if isinstance(t, torch.Tensor):
                sizes[i] += t.numel() * t.element_size()
        handles.append(m.register_forward_hook(hook))
    try:
        run()
    finally:
        for h in handles:
            h.remove()
    return sizes


def _output_bytes(modules: list[nn.Module], run) -> list[int]:
    """Bytes of each module's output during ``run()`` (summed over calls)."""
    def quiet():
        with torch.no_grad():
            run()

    return _hooked_bytes(modules, quiet, lambda inp, out: out)


def _input_grad_bytes(modules: list[nn.Module], run) -> list[int]:
    """Bytes of each module's first input during ``run()`` (summed over calls), where that input needs a
    gradient: what a column-wise parallel layer all-reduces in backward (its input's gradient is a partial sum
    on each rank)."""
    def wanting_gradient(inp, out):
        first = inp[0] if inp else None
        return first if isinstance(first, torch.Tensor) and first.requires_grad else None

    return _hooked_bytes(modules, run, wanting_gradient)


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
    per_layer = layer_figures(workload, model, layers, x, y) if workload.layers is not None else {}
    stats = {
        "parameters": _params(model),
        "parameter_bytes": sum(p.numel() * p.element_size() for p in model.parameters()),
        "flops_per_sample": measure.flops_per_sample(model, workload.loss, x, y),
        "activation_bytes_per_sample": max(per_sample, 0.0),
        "activation_fixed_bytes": max(full - per_sample * n, 0.0),
        "layers": len(layers),
        "largest_layer_parameters": max(_params(m) for m in layers),
        "blocks": len(blocks_of(model, workload)),
        "boundary_bytes_per_sample": float(max(boundaries[:-1] or boundaries)),
        "tokens_per_sample": workload.tokens_per_sample,
        **tensor_parallel_figures(workload, model, x, y),
        **per_layer,
        "layer_output_bytes_per_sample": [float(b) for b in boundaries] if workload.layers is not None else None,
    }
    return stats


def _saved_by_layer(workload, model: nn.Module, layers: list[nn.Module], x: torch.Tensor, y: torch.Tensor) -> list[int]:
    """Bytes first saved for backward in each layer (the loss's go to the last), one forward + backward."""
    probe = measure.TensorBytes(step=1)
    handles = [m.register_forward_pre_hook(lambda *_, i=i: setattr(probe, "region", i)) for i, m in enumerate(layers)]
    probe.start([*model.parameters(), x, y])  # the batch is data, as the trainer's count takes it
    try:
        h = x
        for layer in layers:
            h = layer(h)
        workload.loss(h, y).backward()
    finally:
        probe.stop()
        for handle in handles:
            handle.remove()
    model.zero_grad(set_to_none=True)
    return [probe.by_region.get(i, 0) for i in range(len(layers))]


def layer_figures(workload, model: nn.Module, layers: list[nn.Module], x: torch.Tensor, y: torch.Tensor):
    """Per pipeline layer: forward FLOPs (as the pipeline strategy counts them to balance its stages),
    parameters, and activation bytes saved per sample (the slope between two batch sizes)."""
    from parallelnn.parallel.pipeline import layer_costs

    half = max(1, len(x) // 2)
    full = _saved_by_layer(workload, model, layers, x, y)
    small = _saved_by_layer(workload, model, layers, x[:half], y[:half])
    per_sample = [max(0.0, (f - h) / (len(x) - half)) if len(x) > half else f / len(x) for f, h in zip(full, small)]
    return {"layer_flops": layer_costs(layers, x[:2]), "layer_parameters": [_params(m) for m in layers],
            "layer_activation_bytes_per_sample": per_sample}


def tensor_parallel_figures(workload, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> dict[str, float]:
    """What a tensor-parallel plan divides: the share of the parameters, of the FLOPs and of the saved
    activations that are in the layers it shards, the bytes its row-wise layers all-reduce per sample in a
    forward, and those the backward all-reduces: the gradients of the column-wise layers' inputs (as large as
    the forward's in a transformer's block; in a CNN's head, the flattened features against the logits)."""
    from torch.utils.flop_counter import FlopCounterMode

    from parallelnn.errors import UserError
    from parallelnn.parallel.tensor import plan_of

    try:
        sharded, reduced = plan_of(workload).layers(model)
    except (UserError, AttributeError, NotImplementedError):
        return {"tp_sharded_fraction": 0.0, "tp_allreduce_bytes_per_sample": 0.0}
    total = _params(model) or 1
    reduced_bytes = sum(_output_bytes(reduced, lambda: model(x[:1])))
    columns = [m for m in sharded if all(m is not r for r in reduced)]
    backward = [b for b in _input_grad_bytes(columns, lambda: model(x[:1])) if b]
    model.zero_grad(set_to_none=True)
    half = max(1, len(x) // 2)
    all_full, inside_full = saved_activation_bytes(model, workload.loss, x, y, columns, reduced)
    all_half, inside_half = saved_activation_bytes(model, workload.loss, x[:half], y[:half], columns, reduced)
    # Per sample (the slopes): what does not grow with the batch (the loss's own) is not sharded.
    all_saved, inside = all_full - all_half, inside_full - inside_half
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
            "tp_allreduce_bytes_per_sample": float(reduced_bytes), "tp_allreduce_calls": len(reduced),
            "tp_backward_allreduce_bytes_per_sample": float(sum(backward)),
            "tp_backward_allreduce_calls": len(backward)}
