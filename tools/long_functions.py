"""List functions in parallelnn/ longer than a limit (default 60 lines): a stage of a run should fit on a screen.

    python tools/long_functions.py [LIMIT]      # exit status 1 when any is longer
"""

from __future__ import annotations

import ast
import pathlib
import sys


def long_functions(root: pathlib.Path, limit: int) -> list[str]:
    found = []
    for path in sorted(root.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                length = node.end_lineno - node.lineno + 1
                if length > limit:
                    found.append(f"{path}:{node.lineno} {node.name} ({length} lines)")
    return found


if __name__ == "__main__":
    limit = int(sys.argv[1]) if len(sys.argv) > 1 else 60
    found = long_functions(pathlib.Path(__file__).resolve().parents[1] / "parallelnn", limit)
    print("\n".join(found) or f"no function in parallelnn/ is longer than {limit} lines")
    sys.exit(1 if found else 0)
