"""Results shared by every benchmark: JSON rows on disk, Markdown tables rendered from them.

A script opens one :class:`Results` per run and adds rows (plain dicts) to named tables as they
finish. After every row the whole file ``benchmarks/results/<script>.json`` is rewritten
atomically, so a run that is stopped keeps the rows it finished and never leaves half a file. The
file holds the command, the environment (torch, threads, CPU, load, extension) and, per table,
its columns (``[key, heading]`` pairs) and rows. ``benchmarks/tables.py`` renders these files into
the tables of ``benchmarks/README.md``, ``docs/benchmarks.md`` and ``README.md``.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

RESULTS_DIR = Path(__file__).resolve().parent / "results"


def environment() -> dict[str, Any]:
    """What a reader needs to compare two runs: library versions, threads, machine, load."""
    import torch

    import fastxai
    from fastxai import ops
    from fastxai._machine import cpu_name

    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "none"
    return {
        "fastxai": fastxai.__version__,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "threads": torch.get_num_threads(),
        "cpu": cpu_name(),
        "cores": os.cpu_count(),
        "gpu": device,
        "extension": ops.extension_status(),
        "load_at_start": round(os.getloadavg()[0], 2),
    }


def add_results_option(parser: argparse.ArgumentParser) -> None:
    """``--results PATH`` (default ``benchmarks/results/<script>.json``) and ``--no-results``."""
    parser.add_argument(
        "--results",
        type=Path,
        default=True,
        help="where to write the JSON rows (default: benchmarks/results/<script>.json)",
    )
    parser.add_argument(
        "--no-results",
        dest="results",
        action="store_const",
        const=None,
        help="print the tables only, write no JSON (quick checks)",
    )


def _now() -> str:
    return datetime.datetime.now().astimezone().isoformat(timespec="seconds")


def _atomic_write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f".{path.name}.partial")
    partial.write_text(text)
    os.replace(partial, path)


class Results:
    """The JSON rows of one benchmark run, written to ``path`` after every added row.

    ``path`` defaults to ``benchmarks/results/<script>.json``; ``None`` keeps the rows in memory
    (quick runs that should not replace a recorded result).
    """

    def __init__(self, script: str, path: Path | str | bool | None = True) -> None:
        self.path = RESULTS_DIR / f"{Path(script).stem}.json" if path is True else path
        self.path = Path(self.path) if self.path else None
        self.data: dict[str, Any] = {
            "script": f"benchmarks/{Path(script).name}",
            "command": " ".join(["python", f"benchmarks/{Path(script).name}", *sys.argv[1:]]),
            "started": _now(),
            "finished": None,
            "environment": environment(),
            "tables": {},
        }

    def table(self, name: str, columns: Sequence[Sequence[str]], caption: str = "") -> None:
        """Declare table ``name`` with ``(key, heading[, format])`` columns (rows: dicts by key)."""
        self.data["tables"][name] = {
            "caption": caption,
            "columns": [list(c) for c in columns],
            "rows": [],
        }
        self._write()

    def add(self, name: str, row: dict[str, Any]) -> None:
        """Add one row to table ``name`` and rewrite the file."""
        table = self.data["tables"][name]
        missing = [column[0] for column in table["columns"] if column[0] not in row]
        if missing:
            raise KeyError(f"row for table {name!r} lacks the columns {missing}")
        table["rows"].append(row)
        self._write()

    def finish(self) -> None:
        self.data["finished"] = _now()
        self._write()

    def markdown(self, name: str) -> str:
        return render_table(self.data["tables"][name])

    def _write(self) -> None:
        if self.path is not None:
            _atomic_write(self.path, json.dumps(self.data, indent=1) + "\n")


def _cell(value: Any, fmt: str | None = None) -> str:
    if value is None:
        return "-"
    if fmt is not None and isinstance(value, (int, float)):
        return fmt.format(value)
    if isinstance(value, float):
        return f"{value:.3g}" if abs(value) < 0.01 and value != 0 else f"{value:.2f}"
    return str(value).replace("|", "\\|")


def render_table(table: dict[str, Any]) -> str:
    """A Markdown table of a results table. A column is ``[key, heading]`` or ``[key, heading,
    format]`` (``"{:.1f}"``, ``"{:.3f}x"``); without a format, floats print with two decimals
    (three significant digits below 0.01)."""
    columns = [(c[0], c[1], c[2] if len(c) > 2 else None) for c in table["columns"]]
    lines = ["| " + " | ".join(h for _, h, _ in columns) + " |", "|" + "---|" * len(columns)]
    for row in table["rows"]:
        cells = (_cell(row.get(key), fmt) for key, _, fmt in columns)
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def provenance(data: dict[str, Any]) -> str:
    """One line under a generated table: the command, the date and the machine of its run.

    A results file may carry ``"recorded"``: a note for rows transcribed from the printed table
    of a run made before the script wrote JSON (its date, machine and load, as printed then).
    """
    if data.get("recorded"):
        return f"`{data['command']}` · {data['recorded']}"
    env = data["environment"]
    date = (data.get("finished") or data["started"])[:16].replace("T", " ")
    state = "" if data.get("finished") else " (stopped before the end)"
    return (
        f"`{data['command']}` · {date}{state} · torch {env['torch']} · {env['threads']} threads · "
        f"{env['cpu']} · GPU {env['gpu']} · load at start {env['load_at_start']}"
    )
