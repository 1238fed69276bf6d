"""``parallelnn generate``: completions from a saved (or any Hugging Face) causal language model.

    parallelnn generate --model runs/<id>/model --prompt "def add(a, b):"
    parallelnn generate --model runs/<id>/model --file prompt.py --temperature 0 --max-new-tokens 64
    parallelnn generate --model runs/<id>/model --data problems.jsonl --columns statement=title --limit 5

Prompts: ``--prompt TEXT``, ``--file F`` (the whole file is one prompt), or ``--data FILE`` (one per
row: the template rendered up to ``{solution}``; the template is ``--template``, else the one the
model was trained with, read from its ``parallelnn.json``, else the default). Each prompt starts
after an end-of-text token, as every training document did. Completions stop at end-of-text.
Writes JSONL (id, sample, prompt, completion) to ``--out`` and prints each completion. Without
``--out`` the file goes next to the model: ``MODEL_DIR/generations.jsonl`` (replacing an earlier one),
never into the current directory; a model named by its hub name has no directory, so it needs ``--out``.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


from parallelnn.errors import UserError
from parallelnn.workloads.pretrained import complete

DEFAULT_OUT = "generations.jsonl"  # inside the model directory, unless --out says otherwise


def add_parser(verbs) -> None:
    p = verbs.add_parser("generate", help="complete prompts with a saved model",
                         description="Generate completions with a saved model (OUT/model of a gpt2 run, or any "
                                     "Hugging Face causal LM directory); writes JSONL and prints them.")
    p.add_argument("--model", required=True, metavar="DIR", help="model directory (or a cached hub name)")
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--prompt", metavar="TEXT", help="one prompt")
    source.add_argument("--file", metavar="F", help="a text file that is one prompt")
    source.add_argument("--data", metavar="FILE", help="CSV/JSONL/Parquet: one prompt per row")
    p.add_argument("--columns", metavar="MAP", help="with --data: statement=COL,input=COL,... as for run")
    p.add_argument("--template", metavar="TEXT", help="with --data: the template (default: the model's own)")
    p.add_argument("--limit", type=int, metavar="N", help="with --data: the first N rows only")
    p.add_argument("--max-new-tokens", type=int, default=128, metavar="N", help="tokens to generate (128)")
    p.add_argument("--temperature", type=float, default=0.8, metavar="T", help="0 = greedy (default 0.8)")
    p.add_argument("--top-p", type=float, default=0.95, metavar="P", help="nucleus sampling mass (0.95)")
    p.add_argument("--num-samples", type=int, default=1, metavar="N", help="completions per prompt (1)")
    p.add_argument("--seed", type=int, default=0, metavar="N", help="sampling seed (0)")
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda", "mps"))
    p.add_argument("--out", metavar="FILE.jsonl",
                   help="where the completions go (default: MODEL_DIR/generations.jsonl, next to the model)")
    p.set_defaults(handler=cmd_generate)


def _check(ns: argparse.Namespace) -> None:
    if ns.max_new_tokens < 1:
        raise UserError(f"--max-new-tokens must be positive, got {ns.max_new_tokens}")
    if ns.temperature < 0:
        raise UserError(f"--temperature must be zero or more, got {ns.temperature}")
    if not 0 < ns.top_p <= 1:
        raise UserError(f"--top-p must be in (0, 1], got {ns.top_p}")
    if ns.num_samples < 1:
        raise UserError(f"--num-samples must be positive, got {ns.num_samples}")
    if ns.num_samples > 1 and ns.temperature == 0:
        raise UserError("--temperature 0 (greedy) gives one completion per prompt; sample several with a "
                        "temperature above 0")
    if ns.limit is not None and ns.limit < 1:
        raise UserError(f"--limit must be positive, got {ns.limit}")
    if not ns.data and (ns.columns or ns.template or ns.limit):
        raise UserError("--columns, --template and --limit apply to --data only")
    # Before any generating: where the completions go must be able to take them.
    from parallelnn.record import check_writable_place

    if ns.out is None:
        model_dir = Path(ns.model).expanduser()
        if not model_dir.is_dir():
            from parallelnn.workloads.pretrained import _looks_like_path

            if model_dir.exists() or _looks_like_path(ns.model):
                raise UserError(f"--model {ns.model}: no such model directory")
            raise UserError(f"--model {ns.model} is not a directory, so there is no place next to it for the "
                            "completions: name a file with --out FILE.jsonl")
        ns.out = str(model_dir / DEFAULT_OUT)
    out = Path(ns.out)
    if out.is_dir():
        raise UserError(f"--out {ns.out} is a directory; name a file, e.g. {out / 'generations.jsonl'}")
    check_writable_place(out, "--out")


def prompts_from(ns: argparse.Namespace) -> list[tuple[str, str]]:
    """(id, prompt) pairs from --prompt, --file or --data."""
    from parallelnn.data import text

    if ns.prompt is not None:
        return [("prompt", ns.prompt)]
    if ns.file is not None:
        try:
            return [(Path(ns.file).name, Path(ns.file).read_text(encoding="utf-8"))]
        except OSError as err:
            raise UserError(f"--file {ns.file}: {err.strerror or err}")
        except UnicodeDecodeError:
            raise UserError(f"--file {ns.file}: not UTF-8 text")
    problems = text.load_problems(ns.data, ns.columns)
    if ns.template:
        template = text.check_template(ns.template, problems)
    else:
        meta_file = Path(ns.model) / "parallelnn.json"
        meta = json.loads(meta_file.read_text()) if meta_file.is_file() else {}
        template = meta.get("template") or text.default_template(problems)
        try:
            text.check_template(template, problems)
        except UserError as err:
            raise UserError(f"the template {template!r} of --model {ns.model} does not fit --data ({err}); "
                            "map the columns with --columns or pass --template") from None
    records = problems.records[:ns.limit] if ns.limit else problems.records
    return [(r["id"], text.render_prompt(template, r)) for r in records]


def cmd_generate(ns: argparse.Namespace) -> int:
    from parallelnn.launch import resolve_device
    from parallelnn.record import atomic_write_text
    from parallelnn.workloads.pretrained import check_vocab, load_pretrained

    _check(ns)
    device = resolve_device(ns.device)
    pairs = prompts_from(ns)
    loaded = load_pretrained(ns.model, what="--model")
    check_vocab(loaded.tokenizer, loaded.model, f"--model {ns.model}")
    completions = complete(loaded.model, loaded.tokenizer, [p for _, p in pairs], max_new_tokens=ns.max_new_tokens,
                           temperature=ns.temperature, top_p=ns.top_p, seed=ns.seed, num_samples=ns.num_samples,
                           device=device)
    lines = []
    for (pid, prompt), samples in zip(pairs, completions):
        for j, completion in enumerate(samples):
            lines.append(json.dumps({"id": pid, "sample": j, "prompt": prompt, "completion": completion}))
            print(f"--- {pid}" + (f" (sample {j})" if ns.num_samples > 1 else "") + " ---", flush=True)
            print(completion, flush=True)
    out = Path(ns.out)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(out, "\n".join(lines) + "\n")
    except OSError as err:
        raise UserError(f"--out {ns.out}: {err.strerror or err}")
    print(f"{len(lines)} completions -> {out}", flush=True)
    return 0
