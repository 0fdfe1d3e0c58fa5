"""K-fold cross-validation through the real pipeline (kfp.local): families x folds, scored together."""

import json
import re

import numpy as np

from dl_uncertainty.data.rows import unscaled
from dl_uncertainty.data.splits import load_split
from pipelines.local import run_local
from tests.conftest import LOOSE_GATE, TINY


def test_two_folds_train_on_each_other_and_are_scored_out_of_fold(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    run_dir = run_local([*TINY, *LOOSE_GATE, "train.epochs=2", "pipeline.models=[mc_dropout_dnn]", "pipeline.folds=2"],
                        tmp_path / "out")
    printed = capsys.readouterr().out
    for fold in (0, 1):
        assert re.search(rf"^  done  train-evaluate mc_dropout_dnn-fold{fold} +\d+\.\d s$", printed, re.M)

    data = {name: load_split(next(run_dir.rglob(f"preprocess/{name}"))) for name in ("train", "val", "calib", "test")}
    def raw(split):  # each fold model's rows are in its own scaling: compare the data's values (digits: 0-16)
        return [r.tobytes() for r in np.round(unscaled(np.asarray(split.x, np.float64), split.schema), 3) + 0.0]

    pooled = set(raw(data["train"]) + raw(data["val"]))
    held = {}
    for record_path in run_dir.rglob("train-evaluate/metrics"):
        record = json.loads(record_path.read_text())
        task = record_path.parent
        val_rows = load_split(task / "val_rows")
        held[record["fold"]] = raw(val_rows)
        with np.load(task / "predictions") as p:  # validated on its own fold; calib and test fixed
            np.testing.assert_array_equal(p["val_labels"], val_rows.y)
            np.testing.assert_array_equal(p["calib_labels"], data["calib"].y)
            np.testing.assert_array_equal(p["labels"], data["test"].y)
    assert sorted(held) == [0, 1]
    assert not set(held[0]) & set(held[1]) and len(held[0]) + len(held[1]) == len(pooled)
    assert set(held[0]) | set(held[1]) == pooled  # every training row held out exactly once

    assert "## 2-fold cross-validation" in printed and "median fold" in printed
    # one set of metrics over every training row, beside the per-fold mean ± std
    assert re.search(rf"^\| mc_dropout_dnn \| out of fold, pooled \| {len(pooled)} \| [\d.]+ \|", printed, re.M)
    assert re.search(r"^\| mc_dropout_dnn \| each fold \(mean ± std\) \| ~\d+ \| [\d.]+ ± [\d.]+ \|", printed, re.M)
    assert "| mc_dropout_dnn | test, the 2 fold models as one ensemble | 289 | " in printed
    report = next(run_dir.rglob("compare/report")).read_text()  # the HTML comparison carries the same table
    assert "<h2>2-fold cross-validation</h2>" in report and "test, the 2 fold models as one ensemble" in report
    assert report.count("test numbers reported only") == 1  # the selection split said once, in the winner's line
