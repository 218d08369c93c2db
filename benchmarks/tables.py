"""Write the benchmark tables of the docs from the JSON results in ``benchmarks/results/``.

A document marks each generated table with two HTML comments (invisible once rendered)::

    <!-- table: cam_methods/main -->
    ... replaced by the table and a line naming the run ...
    <!-- /table -->

``cam_methods/main`` is table ``main`` of ``benchmarks/results/cam_methods.json``; an optional
``columns=key,key`` after the name keeps those columns only, and ``rows=key:value`` (or
``rows=key:value,value``) only the rows whose ``key`` equals one of the values. Run
``python benchmarks/tables.py`` after a benchmark run to update every document, or ``--check``
to fail when a document is out of date (the tests do).
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _results import RESULTS_DIR, provenance, render_table

ROOT = Path(__file__).resolve().parent.parent
DOCUMENTS = ("README.md", "benchmarks/README.md", "docs/benchmarks.md")
MARKER = re.compile(r"<!-- table: (?P<spec>[^>]*?) -->\n(?P<body>.*?)<!-- /table -->", re.DOTALL)


def _select(table: dict[str, Any], options: dict[str, str], where: str) -> dict[str, Any]:
    keys = [column[0] for column in table["columns"]]
    selected = dict(table)
    if "columns" in options:
        wanted = options["columns"].split(",")
        unknown = [key for key in wanted if key not in keys]
        if unknown:
            raise ValueError(f"{where}: unknown columns {unknown}; the table has {keys}")
        selected["columns"] = [c for key in wanted for c in table["columns"] if c[0] == key]
    if "rows" in options:
        key, _, values = options["rows"].partition(":")
        wanted = values.split(",")
        selected["rows"] = [row for row in table["rows"] if str(row.get(key)) in wanted]
    return selected


def generated(spec: str, where: str, results_dir: Path = RESULTS_DIR) -> str:
    """The text between the markers of ``spec`` (``script/table [columns=...] [rows=k:v]``)."""
    name, *rest = spec.split()
    options = dict(part.split("=", 1) for part in rest)
    script, _, table_name = name.partition("/")
    path = results_dir / f"{script}.json"
    if not path.is_file():
        raise ValueError(f"{where}: table {name!r} needs {path.name} in {results_dir}")
    data = json.loads(path.read_text())
    if table_name not in data["tables"]:
        known = list(data["tables"])
        raise ValueError(f"{where}: {path.name} has no table {table_name!r}; it has {known}")
    table = _select(data["tables"][table_name], options, where)
    caption = f"{table['caption']}\n\n" if table.get("caption") else ""
    return f"{caption}{render_table(table)}\n\n{provenance(data)}\n"


def update(text: str, where: str, results_dir: Path = RESULTS_DIR) -> str:
    def replace(match: re.Match[str]) -> str:
        spec = match.group("spec")
        return f"<!-- table: {spec} -->\n{generated(spec, where, results_dir)}<!-- /table -->"

    return MARKER.sub(replace, text)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="fail if a document is out of date")
    args = parser.parse_args(argv)
    stale = []
    for relative in DOCUMENTS:
        path = ROOT / relative
        text = path.read_text()
        new = update(text, relative)
        if new != text:
            stale.append(relative)
            if not args.check:
                path.write_text(new)
    if args.check and stale:
        print(f"out of date: {', '.join(stale)}; run python benchmarks/tables.py", file=sys.stderr)
        return 1
    if not args.check:
        print(f"updated: {', '.join(stale) or 'nothing'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
