"""GPT-2 fine-tuning: problems merged into texts, packed into full windows, trained as a causal LM.

    parallelnn run gpt2 --epochs 1                                   # HumanEval, small GPT-2 from scratch
    parallelnn run gpt2 --data problems.csv --columns statement=title,solution=code --model ./gpt2
    parallelnn generate --model runs/<id>/model --prompt "def add(a, b):"

Model: ``--model NAME_OR_DIR`` loads with ``AutoModelForCausalLM``/``AutoTokenizer`` from a local
directory, the local Hugging Face cache or the hub (``model_source: pretrained``). Without ``--model``,
or when the hub cannot be reached and the name is not cached, a small GPT-2 (4 layers, 256 wide, 4
heads, 256 positions, no dropout) is initialised from scratch with the run's seed, with a byte-level
BPE tokenizer trained on the training texts (``model_source: scratch``); the output and the record
say which, and why.

Data and packing: :mod:`parallelnn.data.text`. Training windows are the samples: ``y = x`` and the
loss shifts by one inside. Optimiser: AdamW (weight decay 0.01 on matrices), linear warm-up then
cosine decay (``--warmup-steps``, default 5% of the steps), gradient clipping at 1.0.

At the end rank 0 writes ``OUT/model/`` (config.json, model.safetensors, tokenizer files,
parallelnn.json with the template) that plain ``from_pretrained`` loads; with ``--eval-pass-at-k K``
it then samples K completions per test problem that has tests and runs them in the sandbox
(:mod:`parallelnn.sandbox`), never in this process.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from parallelnn.data import text
from parallelnn.data.loaders import ArraySplit
from parallelnn.errors import UserError, warn
from parallelnn.workloads import Workload, gpt2_parallel
from parallelnn.tasks import LM, lm_loss
from parallelnn.workloads.pretrained import check_vocab, complete, load_pretrained, max_positions, no_progress_bars

DEFAULTS = {"epochs": 3, "batch_size": 8, "lr": 3e-4, "log_every": 5, "max_grad_norm": 1.0}  # Workload fields
# The offline default model: GPT-2's architecture, shrunk so that CPUs train it in seconds.
SCRATCH = {"n_layer": 4, "n_embd": 256, "n_head": 4, "n_positions": 256}
SCRATCH_VOCAB = 4096
SCRATCH_NAME = "scratch"  # --model scratch: ask for the scratch model explicitly
# Without dropout, runs with any number of ranks draw no random numbers in the forward pass and so
# match the single-process losses exactly; a few epochs on a small model do not need it.
SCRATCH_DROPOUT = 0.0
WEIGHT_DECAY = 0.01
PASS_AT_K_NEW_TOKENS = 128
# Codex/HumanEval practice: a completion ends where the next top-level statement would begin.
HUMANEVAL_STOPS = ("\nclass ", "\ndef ", "\n#", "\nif ", "\nprint(")
META_FILE = "parallelnn.json"


# -- the model ----------------------------------------------------------------------------------------
class CausalLM(nn.Module):
    """A Hugging Face causal LM whose forward takes token ids and returns only the logits."""

    def __init__(self, hf: nn.Module):
        super().__init__()
        self.hf = hf

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        if input_ids.size(0) == 0:
            # A data-parallel rank's empty share of a last batch shorter than the ranks (loaders.py).
            # Hugging Face attention cannot reshape zero rows, so one row of token 0 runs and is sliced
            # away: every layer still runs (FSDP's gathers, DDP's gradient hooks match the other
            # ranks'), the output has zero rows, and the gradients it adds are exactly zero.
            dummy = input_ids.new_zeros((1, input_ids.size(1)))
            return self.hf(input_ids=dummy, use_cache=False).logits[:0].clone()  # (a view upsets FSDP)
        return self.hf(input_ids=input_ids, use_cache=False).logits


def adamw_cosine(warmup_steps: int | None):
    def make(params, lr: float, total_steps: int):
        from transformers import get_cosine_schedule_with_warmup

        params = [p for p in params if p.requires_grad]
        # Decay the matrices (projections, embeddings), not biases and layer-norm gains.
        groups = [{"params": [p for p in params if p.ndim >= 2], "weight_decay": WEIGHT_DECAY},
                  {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0}]
        groups = [g for g in groups if g["params"]]
        # The fused kernel (CPU and CUDA; the Hugging Face Trainer's default too) takes plain tensors on
        # one device type; sharded (DTensor) parameters keep the default multi-tensor path.
        from torch.distributed.tensor import DTensor

        devices = {p.device.type for p in params}
        fused = len(devices) == 1 and devices <= {"cpu", "cuda"} and not any(isinstance(p, DTensor) for p in params)
        optimizer = torch.optim.AdamW(groups, lr=lr, **({"fused": True} if fused else {}))
        warmup = warmup_steps if warmup_steps is not None else int(0.05 * total_steps)
        return optimizer, get_cosine_schedule_with_warmup(optimizer, warmup, max(total_steps, 1))
    return make


def transformer_blocks(model: nn.Module) -> list[nn.Module]:
    """The repeated blocks of the wrapped model (GPT-2: ``transformer.h``; others: their layer list)."""
    hf = model.hf if isinstance(model, CausalLM) else model
    for path in ("transformer.h", "model.layers", "model.decoder.layers", "gpt_neox.layers"):
        obj: Any = hf
        for part in path.split("."):
            obj = getattr(obj, part, None)
        if isinstance(obj, nn.ModuleList):
            return list(obj)
    lists = [m for m in hf.modules() if isinstance(m, nn.ModuleList)]
    return list(max(lists, key=len)) if lists else []


def fused_activations(model: nn.Module) -> int:
    """Swap GPT-2's GELU written in Python for PyTorch's fused kernel of the same formula; return how many.

    GPT-2's ``gelu_new`` (``NewGELUActivation``, also ``FastGELUActivation``) computes
    ``0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3)))`` as about eight elementwise kernels forward and
    more backward, each a pass over the MLP's widest activations. transformers' own ``GELUTanh``
    (``gelu_pytorch_tanh``: ``gelu(approximate="tanh")``) is one kernel each way, equal up to rounding
    (its docs say so; a test holds them together). A CPU training step of the scratch model is 5% faster
    (219.5 -> 208.5 ms, 5 windows, 2 threads). The config keeps its activation name, so the saved
    model is the model that was trained.
    """
    from transformers.activations import FastGELUActivation, GELUTanh, NewGELUActivation

    swapped = 0
    for module in list(model.modules()):
        for name, child in list(module.named_children()):
            if type(child) in (NewGELUActivation, FastGELUActivation):
                setattr(module, name, GELUTanh())
                swapped += 1
    return swapped


def scratch_model(vocab_size: int, eos_id: int, seed: int) -> nn.Module:
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(vocab_size=vocab_size, bos_token_id=eos_id, eos_token_id=eos_id,
                        resid_pdrop=SCRATCH_DROPOUT, embd_pdrop=SCRATCH_DROPOUT, attn_pdrop=SCRATCH_DROPOUT,
                        **SCRATCH)
    torch.manual_seed(seed)
    return GPT2LMHeadModel(config)


# -- saving -----------------------------------------------------------------------------------------------
def _strip(key: str) -> str:
    for prefix in ("module.", "_orig_mod.", "hf."):
        key = key.removeprefix(prefix)
    return key


def save_hf(state_dict: dict[str, torch.Tensor], out_dir: str, config, tokenizer, meta: dict) -> nn.Module:
    """Write a directory ``from_pretrained`` loads as is; return the model rebuilt from ``state_dict``."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_config(config)
    weights = gpt2_parallel.to_conv1d_state({_strip(k): v.detach().to("cpu", torch.float32)
                                             for k, v in state_dict.items()})
    missing, unexpected = model.load_state_dict(weights, strict=False)
    tied = {k for k in missing if k.endswith("lm_head.weight") and getattr(config, "tie_word_embeddings", True)}
    if unexpected or set(missing) - tied:
        raise RuntimeError(f"state dict does not fit the model: missing {sorted(set(missing) - tied)[:5]}, "
                           f"unexpected {sorted(unexpected)[:5]}")
    if hasattr(model, "tie_weights"):
        model.tie_weights()
    os.makedirs(out_dir, exist_ok=True)
    with no_progress_bars():
        model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    Path(out_dir, META_FILE).write_text(json.dumps(meta, indent=2) + "\n")
    return model


# -- build ------------------------------------------------------------------------------------------------
@dataclass
class Texts:
    """The problems rendered through the template, split into training and test texts."""

    problems: text.Problems
    template: str
    train: list[str]
    test: list[str]
    pass_problems: list[dict]  # test problems with tests, for --eval-pass-at-k


@dataclass
class LanguageModel:
    """The model to fine-tune and its tokenizer, and where they came from."""

    hf: nn.Module
    tokenizer: Any
    context: int
    source: str  # "pretrained" or "scratch"
    name: str
    tokenizer_desc: str


def load_texts(cfg, log) -> Texts:
    problems = text.load_problems(cfg.data, cfg.columns)
    template = text.check_template(cfg.template, problems) if cfg.template else text.default_template(problems)
    train_records, test_records = text.split_records(problems.records, cfg.test_size, cfg.seed)
    pass_problems = []
    if cfg.eval_pass_at_k:
        from parallelnn import sandbox

        pass_problems = [r for r in test_records if r.get("test") and r.get("entry_point")]
        if not pass_problems:
            raise UserError("--eval-pass-at-k needs test problems with tests: map the test and entry_point "
                            "columns (HumanEval style), e.g. --columns test=test,entry_point=entry_point")
        sandbox.require_isolation()
    say_columns(cfg, problems, log)
    return Texts(problems, template, [text.render(template, r) for r in train_records],
                 [text.render(template, r) for r in test_records], pass_problems)


def say_columns(cfg, problems: text.Problems, log) -> None:
    """Which columns were found by name, which rows were dropped, and which text is not trained on."""
    if problems.dropped:
        log(f"{problems.dropped} rows without text in the mapped columns were left out")
    if problems.detected and cfg.data:
        log("columns found by name: " + ", ".join(f"{f}={problems.mapping[f]}" for f in problems.detected)
            + " (--columns FIELD=COLUMN to choose others)")
    if problems.unused_text:
        unused = problems.unused_text
        warn(f"--data {cfg.data}: column{'s' if len(unused) > 1 else ''} {', '.join(unused)} "
             f"hold{'s' if len(unused) == 1 else ''} text that is not trained on; map them to fields with --columns, "
             "e.g. --columns statement=COL,input=COL,solution=COL")


def scratch_lm(cfg, train_texts: list[str], log) -> LanguageModel:
    context = cfg.context or SCRATCH["n_positions"]
    if context > SCRATCH["n_positions"]:
        raise UserError(f"--context {context} is larger than the {SCRATCH['n_positions']} positions the "
                        "scratch model allows")
    tokenizer = text.train_tokenizer(train_texts, SCRATCH_VOCAB, model_max_length=SCRATCH["n_positions"])
    hf = scratch_model(len(tokenizer), tokenizer.eos_token_id, cfg.seed)
    name = "gpt2-scratch ({n_layer} layers, {n_embd} wide, {n_head} heads)".format(**SCRATCH)
    desc = f"byte-level BPE trained on the {len(train_texts)} training texts (vocab {len(tokenizer)})"
    log(f"{'--model scratch' if cfg.model else 'no --model'}: training {name} from scratch, with a {desc}")
    return LanguageModel(hf, tokenizer, context, "scratch", name, desc)


def language_model(cfg, train_texts: list[str], log) -> LanguageModel:
    """``--model`` when given (an error when it cannot be loaded: never another model in its place), else the
    scratch model (also ``--model scratch``)."""
    if cfg.model in (None, SCRATCH_NAME):
        return scratch_lm(cfg, train_texts, log)
    loaded = load_pretrained(cfg.model)
    hf, tokenizer = loaded.model, loaded.tokenizer
    check_vocab(tokenizer, hf, f"--model {cfg.model}")
    limit = max_positions(hf.config)
    context = cfg.context or min(limit or 1024, 1024)
    if limit is not None and context > limit:
        raise UserError(f"--context {context} is larger than the {limit} positions --model {cfg.model} allows")
    if tokenizer.eos_token_id is None:
        raise UserError(f"--model {cfg.model}: its tokenizer has no end-of-text token to separate documents")
    log(f"--model {loaded.name}: pretrained weights, {sum(p.numel() for p in hf.parameters()):,} parameters")
    return LanguageModel(hf, tokenizer, context, "pretrained", loaded.name,
                         f"{loaded.name} ({type(tokenizer).__name__}, vocab {len(tokenizer)})")


def pack(texts: Texts, lm: LanguageModel, log) -> tuple[text.Packed, text.Packed]:
    eos_id = lm.tokenizer.eos_token_id
    train = text.pack(text.encode(lm.tokenizer, texts.train), eos_id, lm.context)
    test = text.pack(text.encode(lm.tokenizer, texts.test), eos_id, lm.context)
    long_texts = train.long_texts + test.long_texts
    if long_texts:
        log(f"{long_texts} of {len(texts.train) + len(texts.test)} texts are longer than the {lm.context}-token "
            "context: packing continues them across windows")
    log(f"packed {len(texts.train)} training texts ({train.stream_tokens:,} tokens with EOS) into "
        f"{len(train.windows)} full windows of {lm.context} ({train.wrapped_tokens} wrapped from the start); "
        f"test: {len(texts.test)} texts, {len(test.windows)} windows")
    return train, test


def facts(texts: Texts, lm: LanguageModel, train: text.Packed, test: text.Packed, fused: int) -> dict[str, Any]:
    """What the record says about the data and model."""
    return {
        "model_source": lm.source, "model": lm.name, "tokenizer": lm.tokenizer_desc,
        "vocab_size": len(lm.tokenizer), "context": lm.context,
        "parameters": sum(p.numel() for p in lm.hf.parameters()),
        "template": texts.template, "columns": texts.problems.mapping, "dropped_rows": texts.problems.dropped,
        "columns_detected": list(texts.problems.detected), "unused_text_columns": list(texts.problems.unused_text),
        "train_texts": len(texts.train), "test_texts": len(texts.test),
        "train_windows": len(train.windows), "test_windows": len(test.windows),
        "train_stream_tokens": train.stream_tokens, "wrapped_tokens": train.wrapped_tokens,
        "texts_windowed": train.long_texts + test.long_texts, "fused_activations": fused,
    }


def build(cfg, device: torch.device, log=print) -> Workload:
    texts = load_texts(cfg, log)
    text.set_tokenizers_parallelism(cfg.workers)
    lm = language_model(cfg, texts.train, log)
    train, test = pack(texts, lm, log)
    fused = fused_activations(lm.hf)
    meta = {"template": texts.template, "prompt_template": text.prompt_template(texts.template),
            "context": lm.context, "model_source": lm.source, "model": lm.name, "columns": texts.problems.mapping,
            "dataset": texts.problems.dataset}

    def save(state_dict: dict[str, torch.Tensor], out: Path) -> Path:
        save_hf(state_dict, str(out / "model"), lm.hf.config, lm.tokenizer, meta)
        log(f"saved the model and tokenizer to {out / 'model'}")
        return out / "model"

    def pass_at_k(saved: Path) -> dict[str, Any]:
        from transformers import AutoModelForCausalLM

        with no_progress_bars():
            model = AutoModelForCausalLM.from_pretrained(saved)
        return evaluate_pass_at_k(model, lm.tokenizer, texts.pass_problems, texts.template, cfg.eval_pass_at_k,
                                  cfg.seed, device, log)

    return Workload(
        model=CausalLM(lm.hf), train=ArraySplit(train.windows, train.windows),
        test=ArraySplit(test.windows, test.windows), dataset=texts.problems.dataset, loss=lm_loss,
        metrics=LM, optimizer=adamw_cosine(cfg.warmup_steps), **DEFAULTS,
        blocks=transformer_blocks, layers=gpt2_parallel.pipeline_layers, tensor_plan=gpt2_parallel.GPT2TensorPlan(),
        save=save, evaluate_saved=pass_at_k if cfg.eval_pass_at_k else None, tokens_per_sample=lm.context,
        track_grad_norm=True, facts=facts(texts, lm, train, test, fused),
    )


def evaluate_pass_at_k(model, tokenizer, problems: list[dict], template: str, k: int, seed: int,
                       device: torch.device, log) -> dict[str, Any]:
    """Sample ``k`` completions per problem here; run each with its tests in the sandbox, not here."""
    from parallelnn import sandbox

    prompts = [text.render_prompt(template, p) for p in problems]
    log(f"pass@{k}: sampling {k} completions for each of {len(problems)} test problems with tests")
    completions = complete(model, tokenizer, prompts, max_new_tokens=PASS_AT_K_NEW_TOKENS, temperature=0.8,
                           top_p=0.95, seed=seed, num_samples=k, device=device, stop=HUMANEVAL_STOPS)
    result = sandbox.pass_at_k(problems, prompts, completions, k)
    detail = result["pass_at_k_detail"]
    log(f"pass@{k} = {result['pass_at_k'][f'pass@{k}']:.4f} ({detail['passed_samples']} of "
        f"{detail['samples']} samples passed; {detail['sandbox']})")
    return result
