"""A small Transformer language model of your own, character by character, on a text file.

    parallelnn run examples/tiny_lm.py:build                       # examples/data/tiny.txt
    parallelnn run examples/tiny_lm.py:build --data my.txt --strategy fsdp --nproc 2

The model is ``nn.TransformerEncoder`` layers with a causal mask; ``layers`` hands the pipeline strategy
its parts in order (embedding, each block, head), and FSDP shards each block.
"""

from pathlib import Path

import torch
from torch import nn

import parallelnn

CONTEXT, WIDTH, HEADS, BLOCKS = 64, 64, 4, 2
DEFAULT_TEXT = Path(__file__).with_name("data") / "tiny.txt"


class Embed(nn.Module):
    def __init__(self, vocab: int):
        super().__init__()
        self.tokens, self.positions = nn.Embedding(vocab, WIDTH), nn.Embedding(CONTEXT, WIDTH)

    def forward(self, ids):
        return self.tokens(ids) + self.positions(torch.arange(ids.shape[1], device=ids.device))


class Block(nn.Module):
    """One pre-norm Transformer layer that attends only to earlier positions."""

    def __init__(self):
        super().__init__()
        self.layer = nn.TransformerEncoderLayer(WIDTH, HEADS, 4 * WIDTH, dropout=0.0, batch_first=True,
                                                norm_first=True)

    def forward(self, x):
        mask = nn.Transformer.generate_square_subsequent_mask(x.shape[1], device=x.device)
        return self.layer(x, src_mask=mask, is_causal=True)


class TinyLM(nn.Module):
    def __init__(self, vocab: int):
        super().__init__()
        self.embed = Embed(vocab)
        self.blocks = nn.ModuleList(Block() for _ in range(BLOCKS))
        self.head = nn.Sequential(nn.LayerNorm(WIDTH), nn.Linear(WIDTH, vocab))

    def forward(self, ids):
        x = self.embed(ids)
        for block in self.blocks:
            x = block(x)
        return self.head(x)


def build(cfg):
    text = Path(cfg.data or DEFAULT_TEXT).read_text(encoding="utf-8")
    chars = sorted(set(text))
    ids = torch.tensor([chars.index(c) for c in text])
    windows = ids[: len(ids) // CONTEXT * CONTEXT].view(-1, CONTEXT)  # full windows, no padding
    split = int(0.9 * len(windows))
    model = TinyLM(len(chars))
    return parallelnn.Workload(
        model=model, train=(windows[:split], windows[:split]), test=(windows[split:], windows[split:]), task="lm",
        dataset=f"{Path(cfg.data or DEFAULT_TEXT).name} ({len(text):,} characters, vocab {len(chars)})",
        layers=lambda m: [m.embed, *m.blocks, m.head], tokens_per_sample=CONTEXT,
        epochs=5, batch_size=16, lr=1e-3)
