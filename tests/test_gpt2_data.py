"""gpt2 data: reading CSV/JSONL/Parquet, column mapping, templates, splitting, packing, and bad input."""

import hashlib
import json
import subprocess
import sys

import pytest
import torch

from conftest import main
from parallelnn.data import text
from parallelnn.errors import UserError

ROWS = [
    {"title": "Add two numbers.", "io": "two ints a b", "code": "print(a + b)"},
    {"title": "Print the answer.", "io": "nothing", "code": "42"},  # looks numeric: must stay text
    {"title": "Reverse a string.", "io": "a line s", "code": "print(s[::-1])"},
]


def write_csv(path, rows, columns):
    import csv

    with open(path, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)
    return str(path)


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def test_csv_columns_mapped_and_merged_by_the_default_template(tmp_path):
    data = write_csv(tmp_path / "p.csv", ROWS, ["title", "io", "code"])
    problems = text.load_problems(data, "statement=title,input=io,solution=code")
    assert problems.mapping == {"statement": "title", "input": "io", "solution": "code"}
    assert [r["solution"] for r in problems.records] == ["print(a + b)", "42", "print(s[::-1])"]
    assert [r["id"] for r in problems.records] == ["row-1", "row-2", "row-3"]
    template = text.default_template(problems)
    assert text.render(template, problems.records[0]) == (
        "### Problem\nAdd two numbers.\n\n### Input\ntwo ints a b\n\n### Solution\nprint(a + b)")
    # The generation prompt is the same text up to where the solution begins.
    assert text.render_prompt(template, problems.records[0]) == (
        "### Problem\nAdd two numbers.\n\n### Input\ntwo ints a b\n\n### Solution\n")


def test_jsonl_common_names_recognised_and_empty_rows_dropped(tmp_path):
    rows = [{"ID": 7, "Problem": "Sum a list.", "input_spec": "n numbers", "Code": "print(sum(xs))"},
            {"ID": 8, "Problem": None, "input_spec": "", "Code": None},  # no text at all: left out
            {"ID": 9, "Problem": "Max of a list.", "input_spec": None, "Code": "print(max(xs))"}]
    problems = text.load_problems(write_jsonl(tmp_path / "p.jsonl", rows), None)
    assert problems.mapping == {"id": "ID", "statement": "Problem", "input": "input_spec", "solution": "Code"}
    assert problems.dropped == 1 and [r["id"] for r in problems.records] == ["7", "9"]
    assert problems.records[1]["input"] is None
    assert text.render("{statement}|{input}|{solution}", problems.records[1]) == "Max of a list.||print(max(xs))"


def test_user_template_with_escapes_and_literal_braces(tmp_path):
    data = write_csv(tmp_path / "p.csv", ROWS, ["title", "io", "code"])
    problems = text.load_problems(data, "statement=title,solution=code")
    template = text.check_template(r"Q: {statement}\n{{note}}\nA: {solution}", problems)
    assert text.render(template, problems.records[2]) == "Q: Reverse a string.\n{note}\nA: print(s[::-1])"
    assert text.render_prompt(template, problems.records[2]) == "Q: Reverse a string.\n{note}\nA: "
    with pytest.raises(UserError, match=r"unknown field \{title\}"):
        text.check_template("{title}", problems)
    with pytest.raises(UserError, match=r"uses \{input\} but no column is mapped to input"):
        text.check_template("{statement}{input}", problems)


def test_parquet_is_read_like_the_others(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pylist(ROWS), tmp_path / "p.parquet")
    problems = text.load_problems(str(tmp_path / "p.parquet"), "statement=title,input=io,solution=code")
    assert len(problems.records) == 3 and problems.records[1]["solution"] == "42"
    assert problems.dataset == f"parquet:{tmp_path / 'p.parquet'}"


def test_humaneval_is_the_default_and_splits_by_seed():
    problems = text.load_problems(None, None)
    assert problems.dataset == text.HUMANEVAL and len(problems.records) == 164 and problems.has_tests
    assert text.default_template(problems) == "{statement}{solution}"
    first = problems.records[0]
    assert text.render("{statement}{solution}", first).startswith(first["statement"])
    train, test = text.split_records(problems.records, 0.1, seed=0)
    assert (len(train), len(test)) == (148, 16)
    assert {r["id"] for r in train} | {r["id"] for r in test} == {r["id"] for r in problems.records}
    assert text.split_records(problems.records, 0.1, seed=0)[1] == test
    assert text.split_records(problems.records, 0.1, seed=1)[1] != test


def test_packing_yields_only_full_windows_and_loses_no_token():
    docs = [[1, 2, 3], [4, 5]]
    packed = text.pack(docs, eos_id=0, context=4)
    # stream 1 2 3 0 4 5 0 -> the tail "4 5 0" is completed from the stream's start.
    assert packed.windows.tolist() == [[1, 2, 3, 0], [4, 5, 0, 1]]
    assert (packed.stream_tokens, packed.wrapped_tokens, packed.long_texts) == (7, 1, 0)

    g = torch.Generator().manual_seed(0)
    docs = [torch.randint(1, 500, (int(n),), generator=g).tolist()
            for n in torch.randint(1, 300, (40,), generator=g)]
    stream = [t for d in docs for t in (*d, 0)]
    for context in (2, 7, 64, 256, len(stream), len(stream) + 5):
        packed = text.pack(docs, 0, context)
        n, width = packed.windows.shape
        assert width == context and n == -(-len(stream) // context)  # only full windows, no partial one
        flat = packed.windows.flatten().tolist()
        assert flat[:len(stream)] == stream  # every token, in order, none dropped
        assert flat[len(stream):] == (stream * 2)[:len(flat) - len(stream)]  # the rest wraps to the start
        assert packed.long_texts == sum(len(d) + 1 > context for d in docs)
    # A stream shorter than one window is repeated to fill it.
    assert text.pack([[5, 6]], 0, 7).windows.tolist() == [[5, 6, 0, 5, 6, 0, 5]]


def test_tokenizer_training_is_deterministic_across_processes():
    """Every rank trains its own tokenizer: the same texts must give the same one in any process."""
    texts = [r["statement"] + r["solution"] for r in text.load_problems(None, None).records[:60]]
    digest = hashlib.sha256(text.train_tokenizer(texts, 1000).backend_tokenizer.to_str().encode()).hexdigest()
    code = ("import hashlib; from parallelnn.data import text\n"
            "texts = [r['statement'] + r['solution'] for r in text.load_problems(None, None).records[:60]]\n"
            "print(hashlib.sha256(text.train_tokenizer(texts, 1000).backend_tokenizer.to_str().encode()).hexdigest())")
    other = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert other == digest


def tiny_hf_dir(path, vocab_delta=0, n_positions=64):
    """A small saved GPT-2 (model + tokenizer) standing in for a pretrained checkpoint."""
    from transformers import GPT2Config, GPT2LMHeadModel

    texts = [r["statement"] + r["solution"] for r in text.load_problems(None, None).records]
    tok = text.train_tokenizer(texts, 400, model_max_length=n_positions)
    config = GPT2Config(vocab_size=len(tok) + vocab_delta, n_positions=n_positions, n_embd=32, n_layer=1, n_head=2,
                        bos_token_id=tok.eos_token_id, eos_token_id=tok.eos_token_id)
    torch.manual_seed(0)
    GPT2LMHeadModel(config).save_pretrained(path)
    tok.save_pretrained(path)
    return str(path)


def test_a_model_directory_is_fine_tuned_as_pretrained(tmp_path):
    from conftest import record
    from parallelnn.config import RunConfig
    from parallelnn.runner import execute

    model_dir = tiny_hf_dir(tmp_path / "tiny")
    execute(RunConfig(workload="gpt2", model=model_dir, epochs=1, limit=8, batch_size=4, out=str(tmp_path / "r"),
                      quiet=True))
    rec = record(tmp_path / "r")
    assert rec["model_source"] == "pretrained" and rec["model"] == model_dir and rec["context"] == 64
    assert rec["tokenizer"].startswith(model_dir) and rec["model_source"] == "pretrained"
    assert rec["steps"] == 2 and rec["tokens_seen"] == 8 * 64


BAD = {
    "missing file": (["--data", "{tmp}/none.csv"], "no such file"),
    "unknown type": (["--data", "{tmp}/p.txt"], "unknown file type '.txt'"),
    "absent column": (["--data", "{tmp}/p.csv", "--columns", "statement=title,solution=answer"],
                      "has no column 'answer' (its columns: title, io, code)"),
    "bad mapping": (["--data", "{tmp}/p.csv", "--columns", "statement"], "each entry must be FIELD=COLUMN"),
    "unknown field": (["--data", "{tmp}/p.csv", "--columns", "body=title"], "unknown field 'body'"),
    "no text column": (["--data", "{tmp}/other.csv"], "no column for the statement or the solution"),
    "non-text": (["--data", "{tmp}/lists.jsonl"], "column 'solution' (solution) holds non-text values (row 2: list"),
    "empty after filtering": (["--data", "{tmp}/empty.jsonl"], "empty dataset: none of its 2 rows has text"),
    "broken jsonl": (["--data", "{tmp}/broken.jsonl"], "line 2 is not valid JSON"),
    "not utf-8": (["--data", "{tmp}/latin1.csv"], "not UTF-8 text (invalid continuation byte at line 3, byte 26)"),
    "one row": (["--data", "{tmp}/one.jsonl"], "a train/test split needs at least 2"),
    "bad template": (["--template", "{title}"], "unknown field {title}"),
    "model dir without config": (["--model", "{tmp}"], "has no config.json"),
    "no such model dir": (["--model", "./no/such/model"], "no such model directory"),
    "vocab mismatch": (["--model", "{tmp}/mismatch"], "the tokenizer has"),
    "context too long (scratch)": (["--context", "512"], "larger than the 256 positions the scratch model allows"),
    "context too long (model)": (["--model", "{tmp}/tiny", "--context", "128"], "larger than the 64 positions"),
    "pass@k without tests": (["--data", "{tmp}/p.csv", "--eval-pass-at-k", "1"], "needs test problems with tests"),
}


@pytest.fixture(scope="module")
def bad_inputs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("bad")
    write_csv(tmp / "p.csv", ROWS, ["title", "io", "code"])
    (tmp / "p.txt").write_text("hello\n")
    write_csv(tmp / "other.csv", [{"a": "1", "b": "2"}], ["a", "b"])
    write_jsonl(tmp / "lists.jsonl", [{"statement": "x", "solution": "y"}, {"statement": "x", "solution": ["y"]}])
    write_jsonl(tmp / "empty.jsonl", [{"statement": "", "solution": None}, {"statement": " ", "solution": ""}])
    (tmp / "broken.jsonl").write_text('{"statement": "x"}\n{"statement": \n')
    (tmp / "latin1.csv").write_bytes("statement,solution\nok,y\nna\u00efve,x\n".encode("latin-1"))
    write_jsonl(tmp / "one.jsonl", [{"statement": "x", "solution": "y"}])
    tiny_hf_dir(tmp / "tiny")
    tiny_hf_dir(tmp / "mismatch", vocab_delta=-10)
    return tmp


@pytest.mark.parametrize("name", BAD)
def test_bad_gpt2_input_is_one_line(name, bad_inputs, tmp_path, capsys):
    args, expected = BAD[name]
    args = [a.replace("{tmp}", str(bad_inputs)) for a in args]
    assert main("run", "gpt2", *args, "--out", str(tmp_path / "out"), "--quiet") == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("parallelnn: error:") and expected in err[0], err
