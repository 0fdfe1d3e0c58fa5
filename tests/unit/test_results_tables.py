"""``make results`` (benchmarks/results.py) rewrites only what lies between its markers."""

import importlib.util

import pytest

from tests.conftest import REPO

spec = importlib.util.spec_from_file_location("results", REPO / "benchmarks" / "results.py")
results = importlib.util.module_from_spec(spec)
spec.loader.exec_module(results)


def _records():
    table = {"bnn": [0.05, 0.06, 0.07], "mc_dropout_dnn": [0.03, 0.04, 0.035]}
    return [{"model": m, "seed": 42 + i, "run_id": f"{m}{i}", "metrics": {"nll": v, "acc": 0.99 - v}}
            for m, values in table.items() for i, v in enumerate(values)]


def _outside(text: str, names: list[str]) -> str:
    for name in names:
        start, end = results.marker(name)
        if start in text:
            text = text[: text.index(start)] + text[text.index(end):]
    return text


def test_the_real_files_change_only_between_their_markers(tmp_path):
    copies = []
    for name in ("README.md", "BENCHMARKS.md"):
        (tmp_path / name).write_text((REPO / name).read_text())
        copies.append(tmp_path / name)
    before = [c.read_text() for c in copies]
    tables = results.tables(_records(), "nll", "min", "a note")
    assert set(results.write_tables(tables, copies)) == {"comparison", "seeds"}
    after = [c.read_text() for c in copies]
    for old, new in zip(before, after, strict=True):
        assert _outside(old, list(tables)) == _outside(new, list(tables))
    assert "| `mc_dropout_dnn` | - | **0.9550 ± 0.0050** | **0.0350 ± 0.0050** |" in after[0]
    assert "is `mc_dropout_dnn`; the registered champion is its median seed, 44" in after[0]
    assert "| `mc_dropout_dnn` | `bnn` | 0.0250 |" in after[1] and "| 3 of 3 | beyond seed noise |" in after[1]
    assert results.write_tables(tables, copies) and [c.read_text() for c in copies] == after  # idempotent


def test_a_missing_or_doubled_marker_is_refused(tmp_path):
    page = tmp_path / "page.md"
    page.write_text("no markers here\n")
    with pytest.raises(SystemExit, match="no markers for comparison"):
        results.write_tables({"comparison": "x"}, [page])
    start, end = results.marker("comparison")
    page.write_text(f"{start}\na\n{end}\n{start}\nb\n{end}\n")
    with pytest.raises(SystemExit, match="found 2"):
        results.write_tables({"comparison": "x"}, [page])
    assert page.read_text() == f"{start}\na\n{end}\n{start}\nb\n{end}\n"
