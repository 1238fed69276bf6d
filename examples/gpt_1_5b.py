"""A GPT of 1.5 B parameters (GPT-2 XL's shape): larger than a laptop trains, predicted on GPUs you name.

    parallelnn advise examples/gpt_1_5b.py:build --trials 0 --predict 4x8xV100-ib1 --precision fp16

``model`` is a function, so advise can build it on the meta device (no memory) to count its parameters,
FLOPs and activations; the data here is random tokens, only their shape matters for a prediction.
"""

import torch

import parallelnn

CONTEXT = 1024


def build(cfg):
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(n_layer=48, n_embd=1600, n_head=25, n_positions=CONTEXT)
    tokens = torch.randint(0, config.vocab_size, (64, CONTEXT), generator=torch.Generator().manual_seed(cfg.seed))
    return parallelnn.Workload(model=lambda: GPT2LMHeadModel(config), train=(tokens, tokens), test=(tokens, tokens),
                               task="lm", tokens_per_sample=CONTEXT, batch_size=64, dataset="random tokens")
