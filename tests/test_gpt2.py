"""gpt2 end to end: train on HumanEval, metrics and record, the saved directory with plain transformers,
the generate verb, gradient accumulation, the hub fallback, and the pass@k sandbox."""

import json
import math
import socket
import time

import pytest
import torch

from conftest import cli, events, main, record, step_losses
from parallelnn import sandbox
from parallelnn.config import RunConfig
from parallelnn.data import text
from parallelnn.runner import execute

STEP_METRICS = {"train/loss", "train/learning_rate", "train/grad_norm", "train/epoch", "train/global_step",
                "train/samples_per_second", "train/tokens_per_second", "mfu"}
EVAL_METRICS = {"eval/loss", "eval/perplexity", "eval/runtime", "eval/samples_per_second", "eval/steps_per_second"}


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """``parallelnn run gpt2`` on the embedded HumanEval default, a few steps of the scratch model."""
    out = tmp_path_factory.mktemp("gpt2") / "run"
    proc = cli("run", "gpt2", "--epochs", "1", "--limit", "24", "--context", "128", "--test-size", "0.05",
               "--log-every", "1", "--eval-every", "2", "--out", str(out))
    assert proc.returncode == 0, proc.stderr
    return out, proc


def test_run_reports_scratch_model_packing_and_hf_metric_names(trained):
    out, proc = trained
    assert "no --model: training gpt2-scratch (4 layers, 256 wide, 4 heads) from scratch" in proc.stdout
    assert "texts are longer than the 128-token context" in proc.stdout
    rec = record(out)
    assert rec["dataset"] == text.HUMANEVAL and rec["model_source"] == "scratch"
    assert rec["tokenizer"].startswith("byte-level BPE trained on the 156 training texts")
    assert rec["train_texts"] == 156 and rec["test_texts"] == 8 and rec["texts_windowed"] > 0
    assert rec["fused_activations"] == 4  # one GELU per block
    assert rec["steps"] == 3 and rec["tokens_per_sample"] == 128 and rec["tokens_seen"] == 24 * 128
    assert rec["tokens_per_second"] > 0 and rec["eval_loss"] == rec["test_loss"]
    assert rec["perplexity"] == pytest.approx(math.exp(rec["eval_loss"]))
    steps, evals = events(out, "step"), events(out, "eval")
    assert len(steps) == 3 and all(STEP_METRICS <= set(e) for e in steps)
    assert [e["train/global_step"] for e in evals] == [2, 3] and all(EVAL_METRICS <= set(e) for e in evals)
    # Cosine decay over the run's 3 steps, no warm-up at 5% of 3 steps: 3e-4 * (1 + cos(pi * s / 3)) / 2.
    lrs = [e["train/learning_rate"] for e in steps]
    assert lrs == pytest.approx([3e-4 * (1 + math.cos(math.pi * s / 3)) / 2 for s in (1, 2, 3)])


def test_saved_directory_loads_with_plain_transformers_and_reproduces_the_eval_loss(trained):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out, _ = trained
    model_dir = out / "model"
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"} <= {
        p.name for p in model_dir.iterdir()}
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    tok = AutoTokenizer.from_pretrained(model_dir)
    assert len(tok) == model.config.vocab_size == record(out)["vocab_size"]
    # The test windows, rebuilt from the saved tokenizer: plain transformers gives the recorded eval loss.
    problems = text.load_problems(None, None)
    _, test = text.split_records(problems.records, 0.05, seed=0)
    ids = [tok(text.render("{statement}{solution}", r))["input_ids"] for r in test]
    windows = text.pack(ids, tok.eos_token_id, 128).windows
    with torch.no_grad():
        loss = model(input_ids=windows, labels=windows).loss.item()
    assert loss == pytest.approx(record(out)["eval_loss"], rel=1e-4)
    prompt = tok("def add(a, b):", return_tensors="pt")
    generated = model.generate(**prompt, max_new_tokens=8, do_sample=False, pad_token_id=tok.eos_token_id)
    assert generated.shape[1] > prompt["input_ids"].shape[1]


def test_fused_gelu_trains_the_same_model_as_gpt2s_own():
    import copy

    from parallelnn.workloads import gpt2

    reference = gpt2.scratch_model(512, 0, seed=0)
    fused = copy.deepcopy(reference)
    assert gpt2.fused_activations(fused) == 4 and gpt2.fused_activations(fused) == 0
    x = torch.randint(0, 512, (2, 64), generator=torch.Generator().manual_seed(0))
    outputs = []
    for model in (reference, fused):
        loss = model(input_ids=x, labels=x).loss
        loss.backward()
        outputs.append((loss.item(), torch.cat([p.grad.flatten() for p in model.parameters()])))
    assert outputs[1][0] == pytest.approx(outputs[0][0], rel=1e-6)
    assert torch.allclose(outputs[1][1], outputs[0][1], rtol=1e-4, atol=1e-7)


def test_generate_prints_and_writes_a_completion(trained, tmp_path, capsys):
    out, _ = trained
    gen = tmp_path / "gen.jsonl"
    proc = cli("generate", "--model", str(out / "model"), "--prompt", "def add(a, b):", "--max-new-tokens", "16",
               "--out", str(gen))
    assert proc.returncode == 0, proc.stderr
    (line,) = [json.loads(x) for x in gen.read_text().splitlines()]
    assert line["id"] == "prompt" and line["prompt"] == "def add(a, b):" and line["completion"].strip()
    assert line["completion"].strip().splitlines()[0] in proc.stdout
    # Rows of a data file, rendered with the template the model was trained with; bad input is one line.
    data = tmp_path / "p.jsonl"
    data.write_text(json.dumps({"task_id": "t1", "prompt": "def inc(x):\n", "canonical_solution": "", "test": "",
                                "entry_point": "inc"}) + "\n")
    assert main("generate", "--model", str(out / "model"), "--data", str(data), "--max-new-tokens", "4",
                "--num-samples", "2", "--out", str(gen)) == 0
    lines = [json.loads(x) for x in gen.read_text().splitlines()]
    assert [(x["id"], x["sample"], x["prompt"]) for x in lines] == [("t1", 0, "def inc(x):\n"), ("t1", 1, "def inc(x):\n")]
    capsys.readouterr()
    for args, message in ((["--model", str(tmp_path), "--prompt", "x"],
                           f"--model {tmp_path}: the directory has no config.json (not a saved Hugging Face model)"),
                          (["--model", str(out / "model"), "--prompt", "x", "--temperature", "0", "--num-samples", "2"],
                           "--temperature 0 (greedy) gives one completion per prompt"),
                          (["--model", str(out / "model"), "--prompt", "x", "--out", str(tmp_path)],
                           f"--out {tmp_path} is a directory; name a file")):
        assert main("generate", "--out", str(gen), *args) == 2  # a later --out wins
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith(f"parallelnn: error: {message}"), err


def test_gradient_accumulation_gives_the_same_steps(tmp_path):
    kw = dict(workload="gpt2", epochs=1, limit=8, batch_size=4, context=64, test_size=0.02, log_every=1, quiet=True)
    execute(RunConfig(out=str(tmp_path / "a"), **kw))
    execute(RunConfig(out=str(tmp_path / "b"), grad_accum=2, **kw))
    assert step_losses(tmp_path / "b") == pytest.approx(step_losses(tmp_path / "a"), rel=1e-5)


def test_unreachable_model_is_an_error_that_says_how_to_get_it(tmp_path, monkeypatch, capsys):
    """No silent substitution: an unreachable --model stops before training and says what to do instead."""
    from conftest import main

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    out = tmp_path / "r"
    assert main("run", "gpt2", "--model", "gpt2", "--epochs", "1", "--out", str(out)) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "the hub is not reachable" in err[0]
    assert "huggingface-cli download gpt2 --local-dir ./gpt2" in err[0] and "--model scratch" in err[0]
    assert not (out / "record.json").exists()


# -- the pass@k sandbox ---------------------------------------------------------------------------------
def test_sandbox_passes_correct_code_and_fails_wrong_code():
    problems = [r for r in text.load_problems(None, None).records[:3]]
    prompts = [p["statement"] for p in problems]
    right = [[p["solution"]] for p in problems]
    wrong = [["    return None\n"] for _ in problems]
    assert sandbox.pass_at_k(problems, prompts, right, 1)["pass_at_k"] == {"pass@1": 1.0}
    result = sandbox.pass_at_k(problems, prompts, [r + w for r, w in zip(right, wrong)], 2)
    assert result["pass_at_k"] == {"pass@1": 0.5, "pass@2": 1.0}
    assert result["pass_at_k_detail"]["samples"] == 6 and result["pass_at_k_detail"]["passed_samples"] == 3


def test_sandbox_has_no_network_even_to_this_machine():
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        port = server.getsockname()[1]
        socket.create_connection(("127.0.0.1", port), timeout=2).close()  # reachable from here
        passed, result = sandbox.run_program(
            f"import socket\nsocket.create_connection(('127.0.0.1', {port}), timeout=2)\n")
    assert not passed and "Network is unreachable" in result


def test_sandbox_enforces_time_memory_and_no_processes():
    t0 = time.perf_counter()
    assert sandbox.run_program("while True:\n    pass\n", timeout=1) == (False, "timed out")
    assert time.perf_counter() - t0 < 10
    passed, result = sandbox.run_program("x = bytearray(3 << 30)\n")
    assert not passed and "MemoryError" in result
    passed, result = sandbox.run_program("import os\nos.system('true')\n")
    assert not passed and "NoneType" in result
    assert sandbox.run_program("assert 1 + 1 == 2\n") == (True, "passed")


def test_pass_at_k_after_training_goes_into_the_record(tmp_path):
    execute(RunConfig(workload="gpt2", epochs=1, limit=4, batch_size=4, context=64, test_size=0.02, eval_pass_at_k=2,
                      out=str(tmp_path / "r"), quiet=True))
    rec = record(tmp_path / "r")
    assert set(rec["pass_at_k"]) == {"pass@1", "pass@2"}
    assert all(0.0 <= v <= 1.0 for v in rec["pass_at_k"].values())
    assert rec["pass_at_k_detail"]["problems"] == 3 and rec["pass_at_k_detail"]["samples"] == 6
    assert "mount, network and pid namespaces" in rec["pass_at_k_detail"]["sandbox"]


def test_generate_writes_next_to_the_model_not_into_the_current_directory(trained, tmp_path, monkeypatch, capsys):
    out, _ = trained
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    assert main("generate", "--model", str(out / "model"), "--prompt", "def f(x):", "--max-new-tokens", "4") == 0
    target = out / "model" / "generations.jsonl"
    assert f"1 completions -> {target}" in capsys.readouterr().out
    (line,) = [json.loads(x) for x in target.read_text().splitlines()]
    assert line["prompt"] == "def f(x):"
    assert list(cwd.iterdir()) == []  # nothing in the current directory
    # A hub name has no directory to write next to: --out is then needed, said before loading anything.
    assert main("generate", "--model", "someorg-not-a-dir", "--prompt", "x") == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "is not a directory" in err[0] and "--out FILE.jsonl" in err[0], err
    assert list(cwd.iterdir()) == []


def test_an_empty_share_runs_every_layer_and_adds_zero_gradients():
    """A data-parallel rank whose share of a short last batch is empty still runs the model (its peers'
    collectives need it) and contributes nothing."""
    from parallelnn.tasks import lm_loss
    from parallelnn.workloads import gpt2

    model = gpt2.CausalLM(gpt2.scratch_model(512, 0, seed=0))
    logits = model(torch.zeros((0, 32), dtype=torch.long))
    assert logits.shape == (0, 32, 512)
    loss = lm_loss(logits, torch.zeros((0, 32), dtype=torch.long))
    loss.backward()
    assert loss.item() == 0.0
    grads = [p.grad for p in model.parameters()]
    assert all(g is not None for g in grads) and all(not g.any() for g in grads)
