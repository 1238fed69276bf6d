"""Pretrained Hugging Face causal language models: loading them (and their tokenizers) from a
directory, the local cache or the hub with one-line errors, and sampling completions from them
(used by ``parallelnn generate`` and by gpt2's pass@k evaluation).

A hub name is tried in the local cache first (no network), then on the hub only if a quick TCP
connection says it is reachable: transformers' own retries take about 25 s to fail offline.
"""

from __future__ import annotations

import contextlib
import os
import socket
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import torch
from torch import nn

from parallelnn.errors import UserError, warn


def max_positions(config) -> int | None:
    for name in ("n_positions", "max_position_embeddings", "n_ctx"):
        value = getattr(config, name, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


@contextlib.contextmanager
def no_progress_bars():
    """transformers draws bars for loading and writing even a one-file model; our output says it instead."""
    from transformers.utils import logging as hf_logging

    enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if enabled:
            hf_logging.enable_progress_bar()


@dataclass
class Loaded:
    model: nn.Module | None  # None: scratch, built once the tokenizer is trained
    tokenizer: Any
    source: str  # "pretrained" | "scratch"
    name: str
    note: str | None = None  # why we fell back to scratch, if we did


def _looks_like_path(name: str) -> bool:
    # "org/model" is a hub name; "runs/x/model" whose parent exists is a mistyped directory.
    return name.startswith(("/", ".", "~")) or (os.sep in name.rstrip(os.sep) and Path(name).parent.exists())


def hub_reachable(timeout: float = 3.0) -> bool:
    """Whether the Hugging Face hub answers a TCP connection (quick, instead of minutes of retries)."""
    if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes") or \
            os.environ.get("TRANSFORMERS_OFFLINE", "").lower() in ("1", "true", "yes"):
        return False
    if any(os.environ.get(v) for v in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")):
        return True  # through a proxy only a real request can tell
    url = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))
    try:
        socket.create_connection((url.hostname, url.port or (443 if url.scheme == "https" else 80)), timeout).close()
        return True
    except OSError:
        return False


def load_pretrained(name: str, *, what: str = "--model", fallback_ok: bool = False) -> Loaded | None:
    """Model + tokenizer from a directory, the local cache or the hub. None: hub unreachable (fallback_ok)."""
    with no_progress_bars():
        return _load_pretrained(name, what, fallback_ok)


def _load_pretrained(name: str, what: str, fallback_ok: bool) -> Loaded | None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = Path(name).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise UserError(f"{what} {name}: the directory has no config.json (not a saved Hugging Face model)")
        return Loaded(*_load_dir(str(path), what, name), "pretrained", name)
    if path.exists() or _looks_like_path(name):
        raise UserError(f"{what} {name}: no such model directory")
    try:  # the local Hugging Face cache first: it needs no network
        tok = AutoTokenizer.from_pretrained(name, local_files_only=True)
        model = AutoModelForCausalLM.from_pretrained(name, local_files_only=True, dtype=torch.float32)
        return Loaded(model, tok, "pretrained", name)
    except (OSError, ValueError):
        pass
    if not hub_reachable():
        if fallback_ok:
            return None
        raise UserError(f"{what} {name}: not a local directory, not in the Hugging Face cache, and the hub is not "
                        f"reachable: download it where the hub is (e.g. `huggingface-cli download {name} --local-dir "
                        f"./{Path(name).name}`) and pass {what} ./{Path(name).name}, or leave {what} out (or say "
                        f"{what} scratch) to train the small GPT-2 from scratch")
    try:
        tok = AutoTokenizer.from_pretrained(name)
        model = AutoModelForCausalLM.from_pretrained(name, dtype=torch.float32)
    except (OSError, ValueError) as err:
        raise UserError(f"{what} {name}: cannot load it from the hub ({str(err).splitlines()[0]})")
    return Loaded(model, tok, "pretrained", name)


def _load_dir(path: str, what: str, name: str):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError, TypeError) as err:
        raise UserError(f"{what} {name}: cannot load its tokenizer ({str(err).splitlines()[0]})")
    try:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    except (OSError, ValueError, KeyError, RuntimeError) as err:
        raise UserError(f"{what} {name}: cannot load it as a causal language model ({str(err).splitlines()[0]})")
    return model, tok


def check_vocab(tokenizer, model, what: str) -> None:
    rows = model.get_input_embeddings().num_embeddings
    if len(tokenizer) > rows:
        raise UserError(f"{what}: the tokenizer has {len(tokenizer)} tokens but the model's embedding has "
                        f"only {rows} rows (tokenizer and model do not belong together)")


# -- sampling ---------------------------------------------------------------------------------------------
SMALL_MODEL_PARAMETERS = 200_000_000


def complete(model, tokenizer, prompts: list[str], *, max_new_tokens: int = 128, temperature: float = 0.8,
             top_p: float = 0.95, seed: int = 0, num_samples: int = 1, device: torch.device | str = "cpu",
             stop: tuple[str, ...] = ()) -> list[list[str]]:
    """``num_samples`` completions of each prompt (sampled, or greedy at temperature 0)."""
    device = torch.device(device)
    model = model.to(device).eval()
    eos = tokenizer.eos_token_id
    limit = max_positions(model.config)
    room = None
    if limit is not None:
        room = limit - max_new_tokens - (eos is not None)
        if room < 1:
            raise UserError(f"--max-new-tokens {max_new_tokens} leaves no room for a prompt in the model's "
                            f"{limit} positions")
    sampling = temperature > 0
    options = {"do_sample": sampling, "max_new_tokens": max_new_tokens, "num_return_sequences": num_samples,
               "pad_token_id": eos if eos is not None else tokenizer.pad_token_id, "eos_token_id": eos}
    if sampling:
        options.update(temperature=temperature, top_p=top_p, top_k=0)
    else:
        options.update(temperature=None, top_p=None, top_k=None)
    if stop:  # stop generating once every sample has reached a stop text (they are cut there anyway)
        options.update(stop_strings=list(stop), tokenizer=tokenizer)
    with _decoding_threads(model, device):
        results, cut = _generate(model, tokenizer, prompts, options, room, seed, stop)
    if cut:
        warn(f"{cut} prompts were longer than the model's {limit} positions allow with --max-new-tokens "
             f"{max_new_tokens}: they keep their last {room} tokens")
    return results


@contextlib.contextmanager
def _decoding_threads(model, device: torch.device):
    """One CPU thread for small models: a decoding step's matrices are so small that waking more
    threads costs more than it saves (measured: 2.3 ms a token with 1 thread, 10-45 ms with 2, on a
    busy 2-core machine)."""
    saved = torch.get_num_threads()
    small = sum(p.numel() for p in model.parameters()) < SMALL_MODEL_PARAMETERS
    if device.type == "cpu" and small:
        torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(saved)


def _generate(model, tokenizer, prompts, options, room, seed, stop):
    from parallelnn.data.text import encode

    eos = tokenizer.eos_token_id
    device = next(model.parameters()).device
    results, cut = [], 0
    for i, ids in enumerate(encode(tokenizer, prompts)):
        if room is not None and len(ids) > room:
            ids, cut = ids[-room:], cut + 1
        ids = ([eos] if eos is not None else []) + ids
        # Each prompt its own seed: its completions do not depend on which prompts came before.
        torch.manual_seed(seed * 1_000_003 + i)
        x = torch.tensor([ids], device=device)
        with torch.no_grad():
            out = model.generate(x, attention_mask=torch.ones_like(x), **options)
        texts = tokenizer.batch_decode(out[:, x.shape[1]:], skip_special_tokens=True)
        results.append([_cut_at(t, stop) for t in texts])
    return results, cut


def _cut_at(text: str, stops: tuple[str, ...]) -> str:
    ends = [i for i in (text.find(s) for s in stops) if i >= 0]
    return text[:min(ends)] if ends else text
