"""Generated shape images through the whole pipeline under kfp.local: models well above chance,
every evaluation report with its Grad-CAM maps."""

import re

import mlflow

from dl_uncertainty.data.shapes import make_shapes
from pipelines.local import run_local
from tests.conftest import LOOSE_GATE, REPO, TINY, run_module


def test_shape_images_train_well_above_chance_with_grad_cam_reports(tmp_path, monkeypatch):
    """A Bayesian CNN and an ensemble of plain ones (MC-Dropout's CNN, without its dropout at test time)."""
    monkeypatch.chdir(tmp_path)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    shapes = make_shapes(tmp_path / "shapes", per_class=60, size=16)
    models = ["bnn", "deep_ensemble"]
    run_dir = run_local([*TINY, *LOOSE_GATE, "data=image_folder", f"data.path={shapes}", "data.image_size=[16,16]",
                         "train.epochs=10", "train.batch_size=16", "train.lr=0.003", "model.conv_channels=[8,16]", "model.ensemble_size=2",
                         "experiment_name=shapes-test", f"pipeline.models=[{','.join(models)}]"], tmp_path / "out")

    client = mlflow.MlflowClient(uri)
    runs = client.search_runs([client.get_experiment_by_name("shapes-test").experiment_id])
    accuracy = {r.data.tags["model_type"]: r.data.metrics["test_accuracy"] for r in runs}
    assert sorted(accuracy) == sorted(models)
    assert all(acc > 0.6 for acc in accuracy.values()), accuracy  # chance: 1/3
    for model in models:
        page = (run_dir / "reports" / f"evaluate-{model}.html").read_text()
        section = page[page.index("<h2>Most uncertain test inputs</h2>"):]
        section = section[: section.index("</section>")]
        assert re.search(r'<img src="data:image/png;base64,[^"]+" alt="Grad-CAM">', section), model


def test_a_corrupt_image_stops_run_local_in_one_line_before_any_task(tmp_path):
    shapes = make_shapes(tmp_path / "shapes", per_class=3, size=8)
    (shapes / "circle" / "notes.png").write_text("hello")
    proc = run_module("pipelines", "run-local", *TINY, "data=image_folder", f"data.path={shapes}",
                      "--pipeline-root", "out", cwd=tmp_path, env={"PYTHONPATH": f"{REPO / 'src'}:{REPO}"}, timeout=120)
    assert proc.returncode != 0
    assert [ln for ln in proc.stderr.splitlines() if ln.strip()] == [
        f"error: {shapes / 'circle' / 'notes.png'} is not a readable image (PNG/JPEG); remove it or replace it"]
    assert not (tmp_path / "out").exists()
