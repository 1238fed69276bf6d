"""GPT-2 fine-tuning, the Hugging Face Trainer written the usual way against parallelnn, in one run.

    python benchmarks/gpt2_vs_hf_trainer.py                     # 1 epoch of HumanEval, CPU, all cores
    python benchmarks/gpt2_vs_hf_trainer.py --epochs 1 --threads 2 --batch-size 8 --device cpu

Both train the same model (the scratch GPT-2: 4 layers, 256 wide, 4 heads, context 256, the same
initial weights) on the same data (HumanEval's training split, same template, same tokenizer) with
the same optimizer settings (AdamW 3e-4, weight decay 0.01, 5% warm-up then cosine, clipping at 1.0)
and the same useful tokens per optimizer step (parallelnn's windows per step are chosen to hold as
many tokens as the Trainer's batches of texts do, unless ``--windows`` says otherwise):

(a) the Trainer as a fine-tuning script usually writes it: each text tokenized on its own, truncated
    to the context, batches padded to their longest text by ``DataCollatorForLanguageModeling``;
(b) ``parallelnn run gpt2``: texts packed into full windows, no padding, and GPT-2's GELU run as
    PyTorch's fused kernel (``gpt2.fused_activations``); ``--hf-fused-gelu`` gives (a) that kernel too,
    to separate the two gains.

Printed: useful (non-padding) training tokens per second of each, where time is the Trainer's
``train_runtime`` and parallelnn's ``train_seconds`` (both the training loop only, no evaluation;
the median of ``--repeat`` alternating rounds),
their ratio, and the test loss of both trained models measured by one function on the same test
texts, both ways: over packed windows and text by text (as the Trainer evaluates). Not a test.
Needs ``pip install 'parallelnn[bench]'`` (the Trainer needs accelerate).
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from parallelnn.config import RunConfig  # noqa: E402
from parallelnn.data import text  # noqa: E402
from parallelnn.launch import keep_freed_memory  # noqa: E402
from parallelnn.runner import execute  # noqa: E402
from parallelnn.workloads import gpt2  # noqa: E402
from parallelnn.workloads.pretrained import no_progress_bars  # noqa: E402

CONTEXT = gpt2.SCRATCH["n_positions"]


class TextDataset(torch.utils.data.Dataset):
    def __init__(self, encodings: list[list[int]]):
        self.encodings = encodings

    def __len__(self) -> int:
        return len(self.encodings)

    def __getitem__(self, i: int) -> dict:
        return {"input_ids": self.encodings[i]}


def hf_trainer(args, tokenizer, train_texts, workdir: str) -> tuple[torch.nn.Module, dict]:
    """(a): the usual script. Returns the trained model and its useful tokens/s."""
    from transformers import DataCollatorForLanguageModeling, Trainer, TrainingArguments

    tokenizer.pad_token = tokenizer.eos_token  # GPT-2 has no pad token; the usual fix
    encodings = tokenizer(train_texts, truncation=True, max_length=CONTEXT)["input_ids"]
    model = gpt2.scratch_model(len(tokenizer), tokenizer.eos_token_id, args.seed)
    if args.hf_fused_gelu:  # what a Trainer user could do by hand: parallelnn's one kernel change
        gpt2.fused_activations(model)
    training_args = TrainingArguments(
        output_dir=workdir, num_train_epochs=args.epochs, per_device_train_batch_size=args.batch_size,
        learning_rate=3e-4, weight_decay=gpt2.WEIGHT_DECAY, warmup_steps=0.05, lr_scheduler_type="cosine",
        max_grad_norm=1.0, logging_steps=5, save_strategy="no", report_to="none", seed=args.seed,
        use_cpu=args.device == "cpu", bf16=args.precision == "bf16", disable_tqdm=True)
    collator = DataCollatorForLanguageModeling(tokenizer, mlm=False)
    trainer = Trainer(model=model, args=training_args, train_dataset=TextDataset(encodings), data_collator=collator)
    metrics = trainer.train().metrics
    # Useful tokens: what the texts hold after truncation; the padded batches process more than that.
    useful = sum(len(e) for e in encodings) * args.epochs
    batches = [encodings[i:i + args.batch_size] for i in range(0, len(encodings), args.batch_size)]
    processed = sum(len(b) * max(len(e) for e in b) for b in batches) * args.epochs  # about: order is shuffled
    return trainer.model, {"seconds": metrics["train_runtime"], "useful_tokens": useful,
                           "processed_tokens": processed}


def parallelnn_run(args, workdir: str) -> tuple[torch.nn.Module, dict]:
    """(b): ``parallelnn run gpt2`` in this process; the model comes back from the saved directory."""
    from transformers import AutoModelForCausalLM

    out = os.path.join(workdir, "run")
    rec = execute(RunConfig(workload="gpt2", epochs=args.epochs, batch_size=args.windows, seed=args.seed,
                            device=args.device, threads=args.threads, precision=args.precision, quiet=True,
                            out=out))
    with no_progress_bars():
        model = AutoModelForCausalLM.from_pretrained(os.path.join(out, "model"))
    # Useful tokens: the stream of texts + EOS once per epoch; the wrapped repeats are not counted.
    return model, {"seconds": rec["train_seconds"], "useful_tokens": rec["train_stream_tokens"] * args.epochs,
                   "processed_tokens": rec["tokens_seen"]}


@torch.no_grad()
def test_losses(model, tokenizer, test_texts: list[str], device: torch.device) -> tuple[float, float]:
    """(mean next-token loss over the packed test windows, token-weighted loss text by text)."""
    model = model.to(device).eval()
    eos = tokenizer.eos_token_id
    ids = text.encode(tokenizer, test_texts)
    windows = text.pack(ids, eos, CONTEXT).windows.to(device)
    packed = model(input_ids=windows, labels=windows).loss.item()
    total = count = 0.0
    for doc in ids:
        x = torch.tensor([doc[:CONTEXT]], device=device)
        if x.shape[1] < 2:
            continue
        total += model(input_ids=x, labels=x).loss.item() * (x.shape[1] - 1)
        count += x.shape[1] - 1
    return packed, total / count


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--batch-size", type=int, default=8, help="texts per step of the Trainer (default 8)")
    p.add_argument("--windows", type=int, help="windows per step of parallelnn (default: the Trainer's useful "
                                                  "tokens per step / context, rounded)")
    p.add_argument("--threads", type=int, default=os.cpu_count(), help="torch threads for both (default: all cores)")
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    p.add_argument("--precision", default="fp32", choices=("fp32", "bf16"))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--hf-fused-gelu", action="store_true",
                   help="give the Trainer's model parallelnn's fused GELU too (not the usual way)")
    p.add_argument("--repeat", type=int, default=3, help="alternating rounds; timings are medians (default 3)")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    keep_freed_memory()  # what parallelnn's ranks do (see README, Performance notes): the same for both
    device = torch.device(args.device)

    # The data exactly as the gpt2 workload prepares it: HumanEval, seeded split, default template.
    problems = text.load_problems(None, None)
    template = text.default_template(problems)
    train_records, test_records = text.split_records(problems.records, 0.1, args.seed)
    train_texts = [text.render(template, r) for r in train_records]
    test_texts = [text.render(template, r) for r in test_records]
    tokenizer = text.train_tokenizer(train_texts, gpt2.SCRATCH_VOCAB, model_max_length=CONTEXT)
    if args.windows is None:
        lengths = [min(len(ids), CONTEXT) for ids in text.encode(tokenizer, train_texts)]
        steps = math.ceil(len(lengths) / args.batch_size)
        args.windows = max(1, round(sum(lengths) / steps / CONTEXT))

    results: dict[str, dict] = {}
    seconds: dict[str, list[float]] = {"HF Trainer (padded)": [], "parallelnn (packed)": []}
    # Alternating (a) and (b) --repeat times, each timing is the median: a busy machine hurts both alike.
    for r in range(args.repeat):
        with tempfile.TemporaryDirectory() as tmp:
            torch.set_num_threads(args.threads)
            hf_model, results["HF Trainer (padded)"] = hf_trainer(args, tokenizer, train_texts,
                                                                  os.path.join(tmp, "hf"))
            torch.set_num_threads(args.threads)
            pnn_model, results["parallelnn (packed)"] = parallelnn_run(args, tmp)
        for name in seconds:
            seconds[name].append(results[name]["seconds"])
        print(f"round {r + 1}/{args.repeat}: HF Trainer {seconds['HF Trainer (padded)'][-1]:.2f}s, "
              f"parallelnn {seconds['parallelnn (packed)'][-1]:.2f}s of training", flush=True)
    for name, model in (("HF Trainer (padded)", hf_model), ("parallelnn (packed)", pnn_model)):
        results[name]["seconds"] = statistics.median(seconds[name])
        results[name]["packed_loss"], results[name]["text_loss"] = test_losses(model, tokenizer, test_texts, device)

    print(f"\nGPT-2 scratch (4x256, context {CONTEXT}) on HumanEval train split ({len(train_texts)} texts), "
          f"{args.epochs} epoch(s), {args.threads} threads, {args.device}, {args.precision}; a step: "
          f"{args.batch_size} texts (a), {args.windows} windows of {CONTEXT} tokens (b)"
          + ("; (a) with the fused GELU too" if args.hf_fused_gelu else ""))
    print(f"{'':22} {'train s':>8} {'useful tok':>11} {'processed':>10} {'useful tok/s':>13} "
          f"{'test loss (packed)':>19} {'test loss (by text)':>20}")
    for name, r in results.items():
        r["tokens_per_second"] = r["useful_tokens"] / r["seconds"]
        print(f"{name:22} {r['seconds']:8.2f} {r['useful_tokens']:11,} {r['processed_tokens']:10,} "
              f"{r['tokens_per_second']:13,.0f} {r['packed_loss']:19.4f} {r['text_loss']:20.4f}")
    a, b = results["HF Trainer (padded)"], results["parallelnn (packed)"]
    ratio = b["tokens_per_second"] / a["tokens_per_second"]
    print(f"\nuseful tokens/s ratio parallelnn / HF Trainer: {ratio:.2f} (target >= 1.5)")
    print(f"test loss, packed windows: parallelnn {b['packed_loss']:.4f} vs HF {a['packed_loss']:.4f} "
          f"(perplexity {math.exp(b['packed_loss']):.1f} vs {math.exp(a['packed_loss']):.1f}); "
          f"text by text: {b['text_loss']:.4f} vs {a['text_loss']:.4f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
