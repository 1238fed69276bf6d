"""One GPU, one table: the study's CNN and a GPT-2-small-shaped model, written the usual way vs parallelnn.

    benchmarks/gpu.sh MNIST_DIR            # the wrapper: sets PYTHONPATH, a time limit, then runs this
    python benchmarks/gpu_bench.py --mnist DIR [--quick]

Rows (each part a subprocess or a guarded call, so one failure leaves the others in the table):
* MNIST, the study's CNN, full MNIST, 10 epochs at batch 64 (``--mnist-epochs``): the study's loop on CUDA
  (a per-sample Dataset, a DataLoader, the model on the GPU), then ``parallelnn run mnist`` eager, with
  ``--cuda-graph`` (fp32, TF32, bf16) and with ``--compile``: training seconds, test accuracy, speed-up.
* GPT-2 12x768, context 512, a byte-level BPE of 4,096 tokens trained on HumanEval's training texts, the same
  random initial weights for all: the Hugging Face Trainer (texts padded per batch) in fp32 and bf16, and
  parallelnn bf16 (packed windows, --compile) at the Trainer's useful tokens per step and at a larger batch:
  useful tokens/s, MFU against the measured peak of the dtype used, eval loss on the test texts (one function
  for all: mean next-token loss over the packed test windows).
* Equality: eager vs --compile vs --cuda-graph step losses in fp32 (relative, at most 1e-5 asked), and
  parallelnn bf16 vs fp32 GPT-2 step losses (relative, at most 2e-2 asked).

Prints the table at the end (and writes OUT/table.txt, OUT/results.json). Not a test: it measures.
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
import time
import traceback
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

RESULTS: dict[str, dict] = {}
START = time.perf_counter()
GPT2_SHAPE = {"n_layer": 12, "n_embd": 768, "n_head": 12}
CONTEXT = 512


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def guarded(name: str):
    """Run a part; a failure is recorded in its row and the benchmark goes on."""
    def wrap(fn):
        def run(*args, **kwargs):
            t0 = time.perf_counter()
            if t0 - START > args[0].budget:
                RESULTS[name] = {"error": f"skipped: the {args[0].budget:.0f}s budget was spent"}
                return
            try:
                fn(*args, **kwargs)
            except Exception as err:  # noqa: BLE001 - the table says what failed
                traceback.print_exc()
                RESULTS.setdefault(name, {})["error"] = f"{type(err).__name__}: {str(err).splitlines()[0][:200]}"
            log(f"{name}: {time.perf_counter() - t0:.0f}s")
        return run
    return wrap


def pnn(args, out: Path, *options: str, timeout: float = 300) -> dict:
    """``parallelnn run ...`` as a user starts it; its record."""
    cmd = [sys.executable, "-m", "parallelnn", "run", *options, "--device", args.device, "--out", str(out),
           "--overwrite", "--quiet"]
    log(" ".join(cmd[2:]))
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout)
    if done.returncode:
        raise RuntimeError((done.stderr.strip().splitlines() or ["no output"])[-1])
    return json.loads((out / "record.json").read_text())


def step_losses(out: Path) -> list[float]:
    lines = (out / "metrics.jsonl").read_text().splitlines()
    return [e["train/loss"] for e in map(json.loads, lines) if e.get("event") == "step"]


def max_rel(a: list[float], b: list[float]) -> float:
    if not a or len(a) != len(b):
        return float("inf")
    return max(abs(x - y) / max(abs(y), 1e-12) for x, y in zip(a, b))


# -- MNIST --------------------------------------------------------------------------------------------------
@guarded("mnist study loop")
def mnist_study(args) -> None:
    """The study's way on CUDA: per-sample Dataset, DataLoader (batch 64, shuffle), model and batches on the GPU."""
    from mnist_cpu import MnistDataset, SimpleCNN
    from torch.utils.data import DataLoader

    from parallelnn import measure
    from parallelnn.data.idx import read_mnist_dir

    arrays = {k: v[:args.mnist_limit] if args.mnist_limit and k.startswith("train") else v
              for k, v in read_mnist_dir(args.mnist).items()}
    device = torch.device(args.device)
    torch.manual_seed(0)
    loader = DataLoader(MnistDataset(arrays["train_images"], arrays["train_labels"]), batch_size=64, shuffle=True,
                        num_workers=args.study_workers)
    model = SimpleCNN().to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    criterion = torch.nn.CrossEntropyLoss()
    measure.synchronize(device)
    t0 = time.perf_counter()
    for _ in range(args.mnist_epochs):
        model.train()
        for x, y in loader:
            x, y = x.to(device), y.to(device)
            optimizer.zero_grad()
            loss = criterion(model(x), y)
            loss.backward()
            optimizer.step()
    measure.synchronize(device)
    seconds = time.perf_counter() - t0
    model.eval()
    test = MnistDataset(arrays["test_images"], arrays["test_labels"])
    correct = 0
    with torch.no_grad():
        for x, y in DataLoader(test, batch_size=1000):
            correct += (model(x.to(device)).argmax(1).cpu() == y).sum().item()
    RESULTS["mnist study loop"] = {"train_seconds": seconds, "test_accuracy": correct / len(test)}


def mnist_pnn(args, name: str, *options: str) -> None:
    @guarded(name)
    def run(args) -> None:
        limit = ("--limit", str(args.mnist_limit)) if args.mnist_limit else ()
        rec = pnn(args, args.out / name.replace(" ", "-"), "mnist", "--data", args.mnist, "--epochs",
                  str(args.mnist_epochs), *limit, *options, timeout=args.part_timeout)
        RESULTS[name] = {k: rec.get(k) for k in ("train_seconds", "test_accuracy", "first_step_seconds", "mfu",
                                                 "peak_dtype", "samples_per_second")}
    run(args)


@guarded("equality mnist")
def mnist_equality(args) -> None:
    """fp32 (TF32 off) step losses of eager, --compile and --cuda-graph: 21 steps, the last one uneven."""
    common = ("mnist", "--data", args.mnist, "--epochs", "1", "--limit", "1300", "--log-every", "1")
    losses = {}
    for name, extra in (("eager", ()), ("compile", ("--compile",)), ("cuda-graph", ("--cuda-graph",)),
                        ("eager-again", ())):
        try:
            pnn(args, args.out / f"eq-mnist-{name}", *common, *extra, timeout=args.part_timeout)
            losses[name] = step_losses(args.out / f"eq-mnist-{name}")
        except Exception as err:  # noqa: BLE001 - one variant failing leaves the others compared
            log(f"equality mnist {name}: {err}")
            losses[name] = []
    eager = losses["eager"]
    RESULTS["equality mnist"] = {
        "steps": len(eager),
        "eager vs eager (run to run)": max_rel(losses["eager-again"], eager),
        "compile vs eager": max_rel(losses["compile"], eager),
        "cuda-graph vs eager": max_rel(losses["cuda-graph"], eager)}


# -- GPT-2 ----------------------------------------------------------------------------------------------------
def gpt2_data(args):
    """HumanEval's texts as the gpt2 workload splits them, a tokenizer trained on the training texts, and a
    GPT-2-small-shaped model with random weights (seed 0) saved where ``--model DIR`` and the Trainer load it."""
    from transformers import GPT2Config, GPT2LMHeadModel

    from parallelnn.data import text
    from parallelnn.workloads import gpt2

    problems = text.load_problems(None, None)
    template = text.default_template(problems)
    train_records, test_records = text.split_records(problems.records, 0.1, 0)
    train_texts = [text.render(template, r) for r in train_records]
    test_texts = [text.render(template, r) for r in test_records]
    tokenizer = text.train_tokenizer(train_texts, gpt2.SCRATCH_VOCAB, model_max_length=CONTEXT)
    model_dir = args.out / "gpt2-small-shape"
    torch.manual_seed(0)
    config = GPT2Config(vocab_size=len(tokenizer), n_positions=CONTEXT, bos_token_id=tokenizer.eos_token_id,
                        eos_token_id=tokenizer.eos_token_id, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
                        **GPT2_SHAPE)
    GPT2LMHeadModel(config).save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    windows = len(text.pack(text.encode(tokenizer, train_texts), tokenizer.eos_token_id, CONTEXT).windows)
    return tokenizer, train_texts, test_texts, model_dir, windows


@torch.no_grad()
def eval_loss(model, tokenizer, test_texts, device: str) -> float:
    from parallelnn.data import text

    model = model.to(device, torch.float32).eval()
    windows = text.pack(text.encode(tokenizer, test_texts), tokenizer.eos_token_id, CONTEXT).windows.to(device)
    return model(input_ids=windows, labels=windows).loss.item()


def hf_trainer(args, name: str, data, bf16: bool) -> None:
    @guarded(name)
    def run(args) -> None:
        from transformers import AutoModelForCausalLM, DataCollatorForLanguageModeling, Trainer, TrainingArguments

        from gpt2_vs_hf_trainer import TextDataset

        tokenizer, train_texts, test_texts, model_dir, _ = data
        tokenizer.pad_token = tokenizer.eos_token
        encodings = tokenizer(train_texts, truncation=True, max_length=CONTEXT)["input_ids"]
        model = AutoModelForCausalLM.from_pretrained(model_dir)
        targs = TrainingArguments(
            output_dir=str(args.out / name.replace(" ", "-")), num_train_epochs=args.gpt2_epochs,
            per_device_train_batch_size=args.hf_batch, learning_rate=3e-4, weight_decay=0.01, warmup_steps=0.05,
            lr_scheduler_type="cosine", max_grad_norm=1.0, logging_steps=50, save_strategy="no", report_to="none",
            seed=0, bf16=bf16, disable_tqdm=True, use_cpu=args.device == "cpu")
        trainer = Trainer(model=model, args=targs, train_dataset=TextDataset(encodings),
                          data_collator=DataCollatorForLanguageModeling(tokenizer, mlm=False))
        metrics = trainer.train().metrics
        useful = sum(len(e) for e in encodings) * args.gpt2_epochs
        RESULTS[name] = {"train_seconds": metrics["train_runtime"], "useful_tokens": useful,
                         "tokens_per_second": useful / metrics["train_runtime"],
                         "eval_loss": eval_loss(trainer.model, tokenizer, test_texts, args.device),
                         "peak_dtype": "bf16" if bf16 else "fp32", "steps": trainer.state.global_step}
    run(args)


def pnn_gpt2(args, name: str, data, windows: int, *options: str) -> None:
    @guarded(name)
    def run(args) -> None:
        from transformers import AutoModelForCausalLM

        tokenizer, _, test_texts, model_dir, n_windows = data
        out = args.out / name.replace(" ", "-")
        # Whole batches only (--limit): with --compile an uneven last batch would compile a second graph.
        limit = max(windows, n_windows // windows * windows)
        rec = pnn(args, out, "gpt2", "--model", str(model_dir), "--context", str(CONTEXT), "--epochs",
                  str(args.gpt2_epochs), "--batch-size", str(windows), "--limit", str(limit), "--log-every", "0",
                  *options, timeout=args.part_timeout)
        # Useful tokens: the windows trained on, without the tokens wrapped around from the stream's start.
        useful = min(limit * CONTEXT, rec["train_stream_tokens"]) * args.gpt2_epochs
        first = rec.get("first_step_seconds") or 0.0
        steady = ((rec["tokens_seen"] - windows * CONTEXT) / (rec["train_seconds"] - first)
                  if rec["train_seconds"] > first else float("nan"))
        RESULTS[name] = {"train_seconds": rec["train_seconds"], "useful_tokens": useful,
                         "tokens_per_second": useful / rec["train_seconds"], "steady_tokens_per_second": steady,
                         "first_step_seconds": first, "mfu": rec["mfu"], "peak_dtype": rec["peak_dtype"],
                         "peak_flops": rec["peak_flops"], "flops_per_token": rec["flops_per_sample"] / CONTEXT,
                         "eval_loss": eval_loss(AutoModelForCausalLM.from_pretrained(out / "model"), tokenizer,
                                                test_texts, args.device), "steps": rec["steps"], "out": str(out)}
    run(args)


@guarded("equality gpt2 bf16")
def gpt2_equality(args, data) -> None:
    """parallelnn GPT-2 step losses, bf16 against fp32, over a few steps (same data, same weights)."""
    model_dir = data[3]
    common = ("gpt2", "--model", str(model_dir), "--context", str(CONTEXT), "--epochs", "1", "--limit", "40",
              "--batch-size", "4", "--log-every", "1")
    fp32, bf16 = args.out / "eq-gpt2-fp32", args.out / "eq-gpt2-bf16"
    pnn(args, fp32, *common, timeout=args.part_timeout)
    pnn(args, bf16, *common, "--precision", "bf16", timeout=args.part_timeout)
    RESULTS["equality gpt2 bf16"] = {"steps": len(step_losses(fp32)),
                                     "bf16 vs fp32": max_rel(step_losses(bf16), step_losses(fp32))}


# -- the table ----------------------------------------------------------------------------------------------
def table(args) -> str:
    from parallelnn import measure

    device = torch.device(args.device)
    lines = [f"device: {measure.device_label(device)}, torch {torch.__version__}"]
    peaks = {}
    for dtype in ("fp32", "tf32", "bf16"):
        try:
            peaks[dtype] = measure.peak_flops_of(device, dtype)
        except Exception:  # noqa: BLE001
            peaks[dtype] = float("nan")
    lines.append("measured peaks: " + ", ".join(f"{d} {v / 1e12:.0f} TFLOP/s" for d, v in peaks.items()))
    study = RESULTS.get("mnist study loop", {}).get("train_seconds")
    lines += ["", f"MNIST, study's CNN, full MNIST, {args.mnist_epochs} epochs, batch 64 "
                  "(targets: <= 3.5 s at >= 99.0%, >= 11x the study loop)",
              f"{'':34} {'train s':>8} {'test acc':>9} {'x study':>8} {'1st step s':>10}"]
    for name, r in RESULTS.items():
        if not name.startswith("mnist"):
            continue
        if "error" in r:
            lines.append(f"{name:34} FAILED: {r['error']}")
            continue
        ratio = study / r["train_seconds"] if study and r.get("train_seconds") else float("nan")
        lines.append(f"{name:34} {r['train_seconds']:8.2f} {r['test_accuracy']:9.4f} {ratio:8.1f} "
                     f"{r.get('first_step_seconds') or 0:10.2f}")
    hf32 = RESULTS.get("gpt2 HF Trainer fp32", {}).get("tokens_per_second")
    hf16 = RESULTS.get("gpt2 HF Trainer bf16", {}).get("tokens_per_second")
    flops_per_token = next((r["flops_per_token"] for r in RESULTS.values() if "flops_per_token" in r), None)
    lines += ["", f"GPT-2 {GPT2_SHAPE['n_layer']}x{GPT2_SHAPE['n_embd']}, context {CONTEXT}, HumanEval train "
                  f"split, {args.gpt2_epochs} epochs (targets: >= 10x Trainer fp32, >= 3x Trainer bf16, MFU >= 0.35 "
                  "of the bf16 peak, eval loss no worse)",
              f"{'':34} {'useful tok/s':>12} {'steady tok/s':>12} {'x fp32':>7} {'x bf16':>7} {'MFU':>6} "
              f"{'dtype':>5} {'eval loss':>9} {'steps':>6}"]
    for name, r in RESULTS.items():
        if not name.startswith("gpt2"):
            continue
        if "error" in r:
            lines.append(f"{name:34} FAILED: {r['error']}")
            continue
        tps = r["tokens_per_second"]
        mfu = r.get("mfu")
        if mfu is None and flops_per_token:  # the Trainer: useful tokens' FLOPs over its dtype's peak
            mfu = tps * flops_per_token / peaks.get(r["peak_dtype"], float("nan"))
        steady = r.get("steady_tokens_per_second", float("nan"))
        lines.append(f"{name:34} {tps:12,.0f} {steady:12,.0f} {tps / hf32 if hf32 else float('nan'):7.1f} "
                     f"{tps / hf16 if hf16 else float('nan'):7.1f} {mfu if mfu is not None else float('nan'):6.3f} "
                     f"{r['peak_dtype']:>5} {r['eval_loss']:9.4f} {r['steps']:6}")
    lines += ["", "equality (max relative difference of step losses)"]
    for name in ("equality mnist", "equality gpt2 bf16"):
        r = RESULTS.get(name, {})
        if "error" in r:
            lines.append(f"  {name}: FAILED: {r['error']}")
            continue
        for k, v in r.items():
            if k != "steps":
                limit = 2e-2 if "bf16" in k else 1e-5
                verdict = "ok" if v <= limit else "a run failed" if math.isinf(v) else f"ABOVE {limit:g}"
                lines.append(f"  {name}, {k}: {v:.2e} over {r['steps']} steps ({verdict})")
    return "\n".join(lines)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--mnist", required=True, help="directory with the four MNIST IDX files (raw or .gz)")
    p.add_argument("--out", type=Path, default=ROOT / "bench-out" / "gpu")
    p.add_argument("--mnist-epochs", type=int, default=10)
    p.add_argument("--gpt2-epochs", type=int, default=10)
    p.add_argument("--hf-batch", type=int, default=8, help="texts per Trainer step (default 8)")
    p.add_argument("--big-batch", type=int, default=16, help="windows per step of parallelnn's throughput row")
    p.add_argument("--with-compile-mnist", action="store_true", help="also the full MNIST run with --compile")
    p.add_argument("--study-workers", type=int, default=0, help="DataLoader workers of the study loop (the study: 0)")
    p.add_argument("--part-timeout", type=float, default=240, help="seconds one parallelnn run may take")
    p.add_argument("--budget", type=float, default=420, help="seconds after which parts not yet begun are skipped")
    p.add_argument("--device", default="cuda", help="cuda; cpu only to smoke-test this script")
    p.add_argument("--mnist-limit", type=int, help="first N MNIST training images (smoke tests)")
    p.add_argument("--gpt2-shape", help="LAYERSxWIDTHxCONTEXT instead of 12x768x512 (smoke tests)")
    p.add_argument("--quick", action="store_true", help="1 MNIST epoch, 2 GPT-2 epochs: a smoke test")
    p.add_argument("--skip", default="", help="comma-separated parts to leave out: mnist,gpt2,equality")
    args = p.parse_args()
    if args.quick:
        args.mnist_epochs, args.gpt2_epochs = 1, 2
    global GPT2_SHAPE, CONTEXT
    if args.gpt2_shape:  # a smaller model, for a smoke test of this script
        layers, width, CONTEXT = map(int, args.gpt2_shape.split("x"))
        GPT2_SHAPE = {"n_layer": layers, "n_embd": width, "n_head": max(1, width // 64)}
    if args.device == "cuda" and not torch.cuda.is_available():
        print("gpu_bench: no CUDA device", file=sys.stderr)
        return 2
    args.out.mkdir(parents=True, exist_ok=True)
    skip = set(filter(None, args.skip.split(",")))
    t0 = time.perf_counter()
    # The headline rows first: what is left when the --budget runs out is the least important.
    if "mnist" not in skip:
        mnist_study(args)
        # TF32 as the study loop has it (cuDNN's default allows TF32 convolutions).
        mnist_pnn(args, "mnist parallelnn cuda-graph tf32", "--cuda-graph", "--tf32")
        mnist_pnn(args, "mnist parallelnn cuda-graph bf16", "--cuda-graph", "--precision", "bf16")
        mnist_pnn(args, "mnist parallelnn eager tf32", "--tf32")
    data = None
    if "gpt2" not in skip or "equality" not in skip:
        try:
            data = gpt2_data(args)
        except Exception as err:  # noqa: BLE001 - the table says so; the MNIST rows stand
            traceback.print_exc()
            RESULTS["gpt2 data"] = {"error": f"{type(err).__name__}: {str(err).splitlines()[0][:200]}"}
            skip.add("gpt2")
    if "gpt2" not in skip:
        hf_trainer(args, "gpt2 HF Trainer fp32", data, bf16=False)
        hf_trainer(args, "gpt2 HF Trainer bf16", data, bf16=True)
        pnn_gpt2(args, f"gpt2 parallelnn bf16 compile b{args.big_batch}", data, args.big_batch, "--precision",
                 "bf16", "--compile")
    if "equality" not in skip:
        mnist_equality(args)
        if data is not None:
            gpt2_equality(args, data)
    if "gpt2" not in skip:
        # Windows per step holding the Trainer's useful tokens per step (its batches of texts).
        lengths = [min(len(ids), CONTEXT) for ids in data[0](data[1], truncation=True, max_length=CONTEXT)["input_ids"]]
        matched = max(1, round(sum(lengths) / math.ceil(len(lengths) / args.hf_batch) / CONTEXT))
        pnn_gpt2(args, f"gpt2 parallelnn bf16 compile b{matched}", data, matched, "--precision", "bf16", "--compile")
    if "mnist" not in skip and args.with_compile_mnist:
        mnist_pnn(args, "mnist parallelnn compile tf32", "--compile", "--tf32")
    text = table(args)
    print("\n" + text)
    print(f"\n(total {time.perf_counter() - t0:.0f}s)")
    (args.out / "table.txt").write_text(text + "\n")
    (args.out / "results.json").write_text(json.dumps(RESULTS, indent=1, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
