"""``parallelnn bench``: runs plus a comparison, written next to the runs' records."""

from __future__ import annotations


def add_parser(verbs) -> None:
    p = verbs.add_parser("bench", help="run a table of configurations and compare them")
    p.set_defaults(handler=lambda ns: 0)
