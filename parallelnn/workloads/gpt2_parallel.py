"""GPT-2 under the model-parallel strategies: the model as a list of layers for pipeline stages, and
a Megatron-style tensor-parallel plan.

Pipeline: ``[Embeddings, Block 0, ..., Block n-1, Head]``; blocks apply their own causal mask (no
padding: every window is full), so the composition equals the model's forward. The head's weight is
tied to the token embedding; the pipeline engine keeps the two copies on the first and last stage
identical by summing their gradients (see ``PipelineEngine``).

Tensor: GPT-2's projections are ``Conv1D`` (weight stored ``[in, out]``), which DTensor's parallel
styles do not know, so each block's projections are swapped for ``nn.Linear`` (weights transposed):
attention ``c_attn`` becomes three Linears q, k, v (column-wise: each rank gets the q/k/v rows of its
heads), ``attn.c_proj`` row-wise, ``mlp.c_fc`` column-wise, ``mlp.c_proj`` row-wise. Embeddings,
layer norms and the head stay replicated. Saving maps the weights back to ``Conv1D`` layout, so the
saved directory is a plain GPT-2 (:func:`to_conv1d_state`).
"""

from __future__ import annotations

import torch
from torch import nn

from parallelnn.errors import UserError


class Embeddings(nn.Module):
    """Token + position embeddings (and dropout) of a GPT-2 ``transformer``."""

    def __init__(self, transformer: nn.Module):
        super().__init__()
        self.wte, self.wpe, self.drop = transformer.wte, transformer.wpe, transformer.drop

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        positions = torch.arange(input_ids.shape[1], device=input_ids.device).unsqueeze(0)
        return self.drop(self.wte(input_ids) + self.wpe(positions))


class Head(nn.Module):
    """Final layer norm and the language-model head."""

    def __init__(self, ln_f: nn.Module, lm_head: nn.Module):
        super().__init__()
        self.ln_f, self.lm_head = ln_f, lm_head

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head(self.ln_f(hidden))


def _gpt2(model: nn.Module):
    hf = getattr(model, "hf", model)
    if not hasattr(hf, "transformer") or not hasattr(hf.transformer, "wpe"):
        raise UserError(f"pipeline and tensor parallelism support GPT-2 models, not {type(hf).__name__}")
    return hf


def pipeline_layers(model: nn.Module) -> list[nn.Module]:
    hf = _gpt2(model)
    return [Embeddings(hf.transformer), *hf.transformer.h, Head(hf.transformer.ln_f, hf.lm_head)]


# -- tensor parallel -------------------------------------------------------------------------------------

class QKV(nn.Module):
    """``c_attn`` as three Linears whose outputs are concatenated [q | k | v], as GPT-2's split expects."""

    def __init__(self, conv) -> None:
        super().__init__()
        embed = conv.weight.shape[0]
        w, b = conv.weight.detach(), conv.bias.detach()
        self.q, self.k, self.v = (nn.Linear(embed, embed) for _ in range(3))
        for i, lin in enumerate((self.q, self.k, self.v)):
            lin.weight.data.copy_(w[:, i * embed:(i + 1) * embed].t())
            lin.bias.data.copy_(b[i * embed:(i + 1) * embed])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.q(x), self.k(x), self.v(x)], dim=-1)


class Conv1DAsLinear(nn.Module):
    """A ``Conv1D`` as an ``nn.Linear`` (held as ``.linear`` so its saved names say it is transposed)."""

    def __init__(self, conv) -> None:
        super().__init__()
        n_in, n_out = conv.weight.shape
        self.linear = nn.Linear(n_in, n_out)
        self.linear.weight.data.copy_(conv.weight.detach().t())
        self.linear.bias.data.copy_(conv.bias.detach())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(x)


class GPT2TensorPlan:
    """Megatron-style tensor parallelism of GPT-2's attention and MLP projections (see the module doc)."""

    def check(self, model: nn.Module, tp: int) -> None:
        config = _gpt2(model).config
        for what, value in (("attention heads", config.n_head), ("hidden size", config.n_embd),
                            ("MLP width", config.n_inner or 4 * config.n_embd)):
            if value % tp:
                raise UserError(f"tensor-parallel degree {tp} does not divide GPT-2's {value} {what}")

    def layers(self, model: nn.Module) -> tuple[list[nn.Module], list[nn.Module]]:
        """(the projections this plan shards, the row-wise ones whose outputs are all-reduced)."""
        blocks = _gpt2(model).transformer.h
        sharded = [m for b in blocks for m in (b.attn.c_attn, b.attn.c_proj, b.mlp.c_fc, b.mlp.c_proj)]
        return sharded, [m for b in blocks for m in (b.attn.c_proj, b.mlp.c_proj)]

    def apply(self, model: nn.Module, tp_mesh) -> dict:
        from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

        tp = tp_mesh.size()
        self.check(model, tp)
        hf = _gpt2(model)
        plan = {}
        for i, block in enumerate(hf.transformer.h):
            attn, mlp = block.attn, block.mlp
            attn.c_attn = QKV(attn.c_attn)
            attn.c_proj = Conv1DAsLinear(attn.c_proj)
            mlp.c_fc = Conv1DAsLinear(mlp.c_fc)
            mlp.c_proj = Conv1DAsLinear(mlp.c_proj)
            attn.split_size //= tp  # each rank holds its heads' q, k and v: split its own output in three
            prefix = f"hf.transformer.h.{i}" if hasattr(model, "hf") else f"transformer.h.{i}"
            for name in ("attn.c_attn.q", "attn.c_attn.k", "attn.c_attn.v", "mlp.c_fc.linear"):
                plan[f"{prefix}.{name}"] = ColwiseParallel()
            for name in ("attn.c_proj.linear", "mlp.c_proj.linear"):
                plan[f"{prefix}.{name}"] = RowwiseParallel()
        parallelize_module(model, tp_mesh, plan)
        return {"sharded": {"attention (q, k, v / c_proj)": "colwise / rowwise",
                            "mlp (c_fc / c_proj)": "colwise / rowwise"},
                "replicated": ["wte", "wpe", "layer norms", "lm_head (tied to wte)"]}


def to_conv1d_state(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Undo :class:`GPT2TensorPlan`'s module swaps in a (full) state dict: plain GPT-2 names and layouts."""
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        if ".attn.c_attn.q." in key:
            base, kind = key.split(".attn.c_attn.q.")
            parts = [state[f"{base}.attn.c_attn.{n}.{kind}"] for n in "qkv"]
            out[f"{base}.attn.c_attn.{kind}"] = (torch.cat([p.t() for p in parts], dim=1) if kind == "weight"
                                                 else torch.cat(parts))
        elif ".attn.c_attn.k." in key or ".attn.c_attn.v." in key:
            continue
        elif ".linear." in key:
            name = key.replace(".linear.", ".")
            out[name] = value.t() if key.endswith("weight") else value
        else:
            out[key] = value
    return out
