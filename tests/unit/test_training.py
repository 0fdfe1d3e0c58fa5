import math

import pytest
import torch
import torchbnn

from dl_uncertainty.config.compose import load_config
from dl_uncertainty.errors import UserError
from dl_uncertainty.families.base import build_model as get_model
from dl_uncertainty.families.bnn import kl_divergence
from dl_uncertainty.families.registry import NAMES
from dl_uncertainty.training.loop import (
    evaluate_split,
    kl_scale,
    loss_terms,
    train_model,
    val_log_probs,
)
from dl_uncertainty.uncertainty import metrics


@pytest.mark.parametrize("model", NAMES)
def test_every_family_beats_90_percent_val_accuracy_in_a_few_epochs(tiny_cfg, digits_splits, model):
    cfg = tiny_cfg(f"model={model}", "train.epochs=8", "model.hidden_sizes=[128]")
    result = train_model(cfg, digits_splits["train"], digits_splits["val"])
    assert result.best["val_acc"] > 0.90
    assert len(result.history["val_nll"]) == 8
    assert ("kl" in result.history) == (model == "bnn")


def _closed_form_kl(model) -> float:
    """KL(N(mu, sigma) || N(prior_mu, prior_sigma)) summed over every weight and bias, by hand."""
    total = 0.0
    for m in model.modules():
        if isinstance(m, (torchbnn.BayesLinear, torchbnn.BayesConv2d)):
            for mu, log_sigma in ((m.weight_mu, m.weight_log_sigma), (m.bias_mu, m.bias_log_sigma)):
                sigma, prior = log_sigma.detach().exp().double(), m.prior_sigma
                total += float((math.log(prior) - sigma.log() + (sigma**2 + (mu.detach().double() - m.prior_mu) ** 2)
                                / (2 * prior**2) - 0.5).sum())
    return total


def test_bnn_elbo_uses_the_summed_kl_scaled_by_one_over_n(tiny_cfg, digits_splits):
    cfg = tiny_cfg("model=bnn", "model.kl_weight=0.5")
    train = digits_splits["train"]
    model = get_model(cfg.model, train.schema.feature_shape, len(train.schema.class_names))
    n_train = len(train.y)
    weight = kl_scale(cfg.model, epoch=1, n_train=n_train)
    assert weight == pytest.approx(0.5 / n_train)
    x, y = torch.as_tensor(train.x[:32]), torch.as_tensor(train.y[:32])
    terms = loss_terms(model, x, y, cfg, weight)
    expected_kl = _closed_form_kl(model)
    assert float(kl_divergence(model)) == pytest.approx(expected_kl, rel=1e-4)
    assert float(terms["loss"] - terms["nll"]) == pytest.approx(0.5 * expected_kl / n_train, rel=1e-4)
    # torchbnn's default 'mean' reduction would be far smaller: make sure we are not using it
    mean_kl = float(torchbnn.BKLLoss(reduction="mean")(model))
    assert float(terms["loss"] - terms["nll"]) != pytest.approx(0.5 * mean_kl / n_train, rel=1e-2)


def test_kl_annealing_ramps_linearly(tiny_cfg):
    cfg = tiny_cfg("model.kl_anneal_epochs=4")
    assert [kl_scale(cfg.model, e, 100) for e in (1, 2, 4, 8)] == pytest.approx([0.0025, 0.005, 0.01, 0.01])


@pytest.mark.parametrize("model", ["bnn", "mc_dropout_dnn"])
def test_resume_gives_the_same_weights_as_an_uninterrupted_run(tiny_cfg, digits_splits, tmp_path, model):
    train, val = digits_splits["train"], digits_splits["val"]
    straight = train_model(tiny_cfg(f"model={model}", "train.epochs=4"), train, val,
                           checkpoint_dir=tmp_path / "a")
    train_model(tiny_cfg(f"model={model}", "train.epochs=2"), train, val, checkpoint_dir=tmp_path / "b")
    resumed = train_model(tiny_cfg(f"model={model}", "train.epochs=4", "train.resume=true"), train, val,
                          checkpoint_dir=tmp_path / "b")
    assert resumed.history == straight.history
    for (name, a), b in zip(straight.model.state_dict().items(), resumed.model.state_dict().values(), strict=True):
        assert torch.equal(a, b), name
    last_a = torch.load(tmp_path / "a" / "last.pt", weights_only=True)["model"]
    last_b = torch.load(tmp_path / "b" / "last.pt", weights_only=True)["model"]
    assert all(torch.equal(last_a[k], last_b[k]) for k in last_a)


@pytest.mark.parametrize(("every_s", "saved_by_epoch_2"), [(0, True), (1e9, False)])
def test_checkpoints_wait_for_their_interval_but_always_keep_the_last_epoch(
        tiny_cfg, digits_splits, tmp_path, every_s, saved_by_epoch_2):
    seen = {}
    cfg = tiny_cfg("train.epochs=3", f"train.checkpoint_every_s={every_s}")
    train_model(cfg, digits_splits["train"], digits_splits["val"], checkpoint_dir=tmp_path,
                on_epoch=lambda epoch, _: seen.setdefault(epoch, (tmp_path / "last.pt").exists()))
    assert seen == {1: False, 2: saved_by_epoch_2, 3: saved_by_epoch_2}
    assert torch.load(tmp_path / "last.pt", weights_only=True)["epoch"] == 3


def _ctrl_c_at(stop_epoch):
    def on_epoch(epoch, _):
        if epoch == stop_epoch:
            raise KeyboardInterrupt
    return on_epoch


def test_ctrl_c_checkpoints_the_last_finished_epoch_and_never_claims_a_stale_one(tiny_cfg, digits_splits, tmp_path):
    from dl_uncertainty.train import _interrupted
    from dl_uncertainty.training.checkpoints import TrainingInterrupted

    train, val = digits_splits["train"], digits_splits["val"]
    train_model(tiny_cfg("train.epochs=1"), train, val, checkpoint_dir=tmp_path)  # an earlier run's last.pt
    stale = (tmp_path / "last.pt").read_bytes()
    cfg = tiny_cfg("train.epochs=10")  # the default checkpoint_every_s: nothing is due after a few epochs
    assert cfg.train.checkpoint_every_s == 10 and not cfg.train.resume

    with pytest.raises(TrainingInterrupted) as stopped:  # during epoch 1: nothing finished
        train_model(cfg, train, val, checkpoint_dir=tmp_path, on_epoch=_ctrl_c_at(1))
    assert (stopped.value.epoch, stopped.value.written) == (0, False)
    assert (tmp_path / "last.pt").read_bytes() == stale
    message = _interrupted(stopped.value, None, tmp_path / "last.pt")
    assert message == "interrupted before the first epoch finished; no checkpoint was written"

    with pytest.raises(TrainingInterrupted) as stopped:  # during epoch 3: epoch 2 is saved
        train_model(cfg, train, val, checkpoint_dir=tmp_path, on_epoch=_ctrl_c_at(3))
    assert (stopped.value.epoch, stopped.value.written) == (2, True)
    assert _interrupted(stopped.value, None, tmp_path / "last.pt") == (
        f"interrupted; epoch 2's checkpoint is at {tmp_path / 'last.pt'}; resume with train.resume=true")
    # the saved state is epoch 2's as it ended: resuming it gives the uninterrupted run
    resumed = train_model(tiny_cfg("train.epochs=4", "train.resume=true"), train, val, checkpoint_dir=tmp_path)
    straight = train_model(tiny_cfg("train.epochs=4"), train, val)
    assert resumed.history == straight.history

    with pytest.raises(TrainingInterrupted) as stopped:  # resumed after epoch 4, stopped in epoch 5
        train_model(tiny_cfg("train.epochs=10", "train.resume=true"), train, val, checkpoint_dir=tmp_path,
                    on_epoch=_ctrl_c_at(5))
    assert (stopped.value.epoch, stopped.value.written) == (4, False)
    assert "still holds epoch 4, as resumed" in _interrupted(stopped.value, None, tmp_path / "last.pt")


def test_an_early_stop_keeps_the_epoch_it_stopped_at(tiny_cfg, digits_splits, tmp_path):
    # steps too small to move a float32 weight: the ensemble (no sampling) never beats its first val
    # NLL, and patience 2 stops it after epoch 3
    cfg = tiny_cfg("model=deep_ensemble", "train.optimizer=sgd", "train.momentum=0", "train.lr=1e-30",
                   "train.epochs=10", "train.early_stopping_patience=2",
                   "train.checkpoint_every_s=1e9")
    result = train_model(cfg, digits_splits["train"], digits_splits["val"], checkpoint_dir=tmp_path)
    assert result.epochs_run == 3
    assert torch.load(tmp_path / "last.pt", weights_only=True)["epoch"] == 3


def test_resume_refuses_a_checkpoint_of_another_model(tiny_cfg, digits_splits, tmp_path):
    from dl_uncertainty.errors import UserError

    train, val = digits_splits["train"], digits_splits["val"]
    train_model(tiny_cfg("train.epochs=1"), train, val, checkpoint_dir=tmp_path)
    with pytest.raises(UserError, match="different model"):
        train_model(tiny_cfg("train.epochs=2", "train.resume=true", "model.hidden_sizes=[32]"), train, val,
                    checkpoint_dir=tmp_path)


def test_training_is_deterministic_on_cpu(tiny_cfg, digits_splits):
    cfg = tiny_cfg("model=mc_dropout_dnn", "train.epochs=2")
    a = train_model(cfg, digits_splits["train"], digits_splits["val"])
    b = train_model(cfg, digits_splits["train"], digits_splits["val"])
    assert a.history == b.history


def test_early_stopping_stops_when_val_nll_stalls(tiny_cfg, digits_splits):
    cfg = tiny_cfg("model=mc_dropout_dnn", "train.epochs=200", "train.early_stopping_patience=2", "train.lr=0.05")
    result = train_model(cfg, digits_splits["train"], digits_splits["val"])
    assert result.epochs_run < 200
    assert result.epochs_run - result.best_epoch == 2


def test_keep_epoch_returns_the_best_or_the_final_epochs_weights(tiny_cfg, digits_splits):
    train, val = digits_splits["train"], digits_splits["val"]
    common = ("model=mc_dropout_dnn", "train.epochs=6", "train.early_stopping_patience=0", "train.lr=0.05",
              "train.val_mc_samples=0")
    best = train_model(tiny_cfg(*common), train, val, quiet=True)
    last = train_model(tiny_cfg(*common, "train.keep_epoch=last"), train, val, quiet=True)
    nll = best.history["val_nll"]
    assert last.history == best.history and nll.index(min(nll)) < len(nll) - 1  # the two runs differ only in what they keep
    assert (best.best_epoch, last.best_epoch) == (nll.index(min(nll)) + 1, 6)
    assert evaluate_split(best.model, val, 0)["nll"] == pytest.approx(min(nll), rel=1e-5)
    assert evaluate_split(last.model, val, 0)["nll"] == pytest.approx(nll[-1], rel=1e-5)
    assert last.best["val_nll"] == nll[-1]


def test_mc_dropout_cnn_and_bnn_cnn_build_for_images(tiny_cfg, digits_splits):
    x = torch.as_tensor(digits_splits["train"].x[:4])
    for name in ("bnn", "mc_dropout_dnn", "deep_ensemble"):
        cfg = tiny_cfg(f"model={name}", "model.arch=cnn")
        model = get_model(cfg.model, [1, 8, 8], 8)
        assert model(x).shape == (4, 8)


def test_per_epoch_validation_defaults_to_one_point_estimate_pass(tiny_cfg, digits_splits):
    val = digits_splits["val"]
    cfg = tiny_cfg("model=mc_dropout_dnn", "train.epochs=3", "train.val_mc_samples=0")
    result = train_model(cfg, digits_splits["train"], val)
    net = result.model.eval()
    with torch.no_grad():
        point = torch.log_softmax(net(torch.as_tensor(val.x)), -1)[None]
    assert torch.allclose(val_log_probs(result.model, val.x, 0), point, atol=1e-6)
    assert result.best["val_nll"] == pytest.approx(metrics.nll(point, val.y), rel=1e-5)
    assert load_config([]).train.val_mc_samples == 0  # the documented default


def test_per_epoch_validation_samples_an_ensemble_by_its_members_and_refuses_negative_counts(tiny_cfg, digits_splits):
    schema = digits_splits["val"].schema
    model = get_model(tiny_cfg("model=deep_ensemble", "model.ensemble_size=3").model, schema.feature_shape,
                      len(schema.class_names))
    assert val_log_probs(model, digits_splits["val"].x[:5], 0).shape == (3, 5, len(schema.class_names))
    with pytest.raises(UserError, match="train.val_mc_samples must be >= 0"):
        tiny_cfg("train.val_mc_samples=-1")
