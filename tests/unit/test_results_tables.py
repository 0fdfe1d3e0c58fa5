"""``make results`` (benchmarks/results.py) rewrites only what lies between its markers."""

import importlib.util

import pytest

from tests.conftest import REPO

spec = importlib.util.spec_from_file_location("results", REPO / "benchmarks" / "results.py")
results = importlib.util.module_from_spec(spec)
spec.loader.exec_module(results)


def _records():
    table = {"bnn": [0.05, 0.06, 0.07], "mc_dropout_dnn": [0.03, 0.04, 0.035]}
    return [{"model": m, "seed": 42 + i, "run_id": f"{m}{i}", "test_rows": 289,
             "metrics": {"nll": v, "acc": 0.99 - v, "alpha": 0.1, "calibration_examples": 217,
                         "coverage_lac": 0.85 + v, "coverage_aps": 0.9}}
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
    assert set(results.write_tables(tables, copies)) == {"comparison", "seeds", "coverage"}
    after = [c.read_text() for c in copies]
    for old, new in zip(before, after, strict=True):
        assert _outside(old, list(tables)) == _outside(new, list(tables))
    assert "| `mc_dropout_dnn` | - | **0.9550 ± 0.0050** | **0.0350 ± 0.0050** |" in after[0]
    assert "is `mc_dropout_dnn`; the registered champion is its median seed, 44" in after[0]
    assert "| `mc_dropout_dnn` | `bnn` | 0.0250 |" in after[1] and "| 3 of 3 | beyond seed noise |" in after[1]
    assert results.write_tables(tables, copies) and [c.read_text() for c in copies] == after  # idempotent


def test_the_coverage_table_checks_each_mean_against_the_band_widened_by_two_standard_errors():
    text = results.coverage_table(_records())
    # n = 217: band [0.9, 0.9 + 1/218]; one split's SE: sqrt(0.09 / 219 + c (1 - c) / 289)
    se = (0.09 / 219 + 0.885 * 0.115 / 289) ** 0.5
    assert f"| `mc_dropout_dnn` | LAC | 0.885 | 0.880, 0.890, 0.885 | [{0.9 - 2 * se:.3f}, {0.9 + 1 / 218 + 2 * se:.3f}] | yes |" in text
    assert "| `bnn` | APS | 0.900 |" in text and "RAPS" not in text
    assert text.endswith("4 of 4 inside the band.")


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
