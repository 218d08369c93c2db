"""The benchmark tables of the docs are generated from ``benchmarks/results/*.json``.

Checks that the documents are in sync with the results, that every marker names a recorded
table, that :class:`Results` writes a valid file after every row and renders the table it holds,
and that no benchmark script imports another script's internals.
"""

from __future__ import annotations

import ast
import json
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"
sys.path.insert(0, str(BENCHMARKS))

import tables  # noqa: E402
from _results import Results  # noqa: E402


def test_documents_are_in_sync_with_the_results(capsys: pytest.CaptureFixture[str]) -> None:
    assert tables.main(["--check"]) == 0, capsys.readouterr().err


def test_every_marker_names_a_recorded_table() -> None:
    specs = [
        (document, match.group("spec"))
        for document in tables.DOCUMENTS
        for match in tables.MARKER.finditer((tables.ROOT / document).read_text())
    ]
    assert len(specs) >= 20
    for document, spec in specs:
        name, *options = spec.split()
        script, _, table = name.partition("/")
        path = BENCHMARKS / "results" / f"{script}.json"
        assert path.is_file(), f"{document}: {spec}"
        data = json.loads(path.read_text())
        assert table in data["tables"], f"{document}: {spec}"
        keys = {column[0] for column in data["tables"][table]["columns"]}
        for option in options:
            kind, _, value = option.partition("=")
            if kind == "columns":
                assert set(value.split(",")) <= keys, f"{document}: {spec}"
            else:
                assert kind == "rows" and value.partition(":")[0] in keys, f"{document}: {spec}"


def test_results_are_written_after_every_row_and_render_their_table(tmp_path: Path) -> None:
    path = tmp_path / "demo.json"
    results = Results("benchmarks/demo.py", path)
    results.table("main", [("name", "name"), ("ms", "time ms", "{:.1f}"), ("ratio", "ratio")])
    rows = [
        {"name": "fused", "ms": 12.345, "ratio": "0.50x"},
        {"name": "eager", "ms": 24.0, "ratio": None},
    ]
    for count, row in enumerate(rows, 1):
        results.add("main", row)
        assert [p.name for p in tmp_path.iterdir()] == ["demo.json"]  # no partial file left
        written = json.loads(path.read_text())
        assert written["tables"]["main"]["rows"] == rows[:count]
        assert written["finished"] is None
    results.finish()
    written = json.loads(path.read_text())
    assert written["script"] == "benchmarks/demo.py"
    assert written["finished"] is not None
    assert results.markdown("main") == (
        "| name | time ms | ratio |\n|---|---|---|\n| fused | 12.3 | 0.50x |\n| eager | 24.0 | - |"
    )
    with pytest.raises(KeyError, match="ratio"):
        results.add("main", {"name": "partial", "ms": 1.0})


def test_a_marker_with_an_unknown_table_names_the_document(tmp_path: Path) -> None:
    data = {"command": "python benchmarks/demo.py", "recorded": "by hand", "tables": {}}
    (tmp_path / "demo.json").write_text(json.dumps(data))
    text = "intro\n<!-- table: demo/missing -->\n<!-- /table -->\n"
    with pytest.raises(ValueError) as error:
        tables.update(text, "docs/example.md", tmp_path)
    message = str(error.value)
    assert "docs/example.md" in message and "missing" in message and "\n" not in message
    text = "<!-- table: absent/main -->\n<!-- /table -->\n"
    with pytest.raises(ValueError, match=r"^docs/example\.md: .*absent\.json[^\n]*$"):
        tables.update(text, "docs/example.md", tmp_path)


def test_no_benchmark_script_imports_another_script() -> None:
    scripts = {p.stem for p in BENCHMARKS.glob("*.py") if not p.stem.startswith("_")}
    offenders = []
    for path in BENCHMARKS.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names = [alias.name.split(".")[0] for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module.split(".")[0]]
            else:
                continue
            offenders += [f"{path.name} imports {name}" for name in names if name in scripts]
    assert not offenders
