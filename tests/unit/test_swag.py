import copy

import pytest
import torch
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.utils import parameters_to_vector, vector_to_parameters

from dl_uncertainty.config.compose import load_config
from dl_uncertainty.errors import UserError
from dl_uncertainty.families.base import build_model
from dl_uncertainty.families.predict import predict_log_probs, served_log_probs
from dl_uncertainty.families.swag import FAMILY
from dl_uncertainty.tracking.bundle import load_bundle, save_bundle
from dl_uncertainty.training.loop import train_model
from tests.conftest import TINY


def _snapshots(model, cfg, epochs: int, seed: int = 0) -> list[torch.Tensor]:
    """Give the net new random weights each epoch and call the hook; return the weights it saw."""
    gen, seen = torch.Generator().manual_seed(seed), []
    for epoch in range(1, epochs + 1):
        with torch.no_grad():
            for p in model.net.parameters():
                p.copy_(torch.randn(p.shape, generator=gen))
        seen.append(parameters_to_vector(model.net.parameters()).detach().clone())
        FAMILY.epoch_end(model, epoch, cfg)
    return seen


def test_hook_moments_equal_brute_force_mean_second_moment_and_deviations(tiny_cfg):
    cfg = tiny_cfg("model=swag", "model.rank=3", "model.swa_start=3", "model.collect_every=2",
                   "train.epochs=13", "model.hidden_sizes=[4]")
    model = build_model(cfg.model, [5], 3)
    seen = _snapshots(model, cfg, 13)
    kept = torch.stack(seen[2::2])  # epochs 3, 5, ..., 13: six snapshots
    assert int(model.count) == len(kept) == 6
    torch.testing.assert_close(model.mean, kept.mean(0))
    torch.testing.assert_close(model.sq_mean, (kept**2).mean(0))
    # snapshot i's deviation from the mean of snapshots 1..i, in row (i - 1) % rank: the last three
    for i in (4, 5, 6):
        torch.testing.assert_close(model.dev[(i - 1) % 3], kept[i - 1] - kept[:i].mean(0))


def test_samples_have_the_swag_covariance(tiny_cfg):
    cfg = tiny_cfg("model=swag", "model.rank=4", "model.hidden_sizes=[]", "model.scale=0.5")
    model = build_model(cfg.model, [2], 2)  # one linear layer: 6 weights
    gen = torch.Generator().manual_seed(1)
    size = model.mean.numel()
    diag = torch.rand(size, generator=gen) * 0.5 + 0.1
    with torch.no_grad():
        model.mean.copy_(torch.randn(size, generator=gen))
        model.sq_mean.copy_(model.mean**2 + diag)
        model.dev.copy_(torch.randn(4, size, generator=gen))
        model.count.fill_(9)
    draws = torch.stack([model.weights(seed=5, t=t) for t in range(12_000)]).double()
    expected = 0.5 * (torch.diag(diag) + model.dev.T @ model.dev / 3).double()
    assert (draws.mean(0) - model.mean.double()).abs().max() < 0.03
    assert (torch.cov(draws.T) - expected).abs().max() < 0.06 * expected.abs().max()


@pytest.fixture(scope="module")
def trained_mlp(digits_splits):
    cfg = load_config([*TINY, "model=swag", "train.epochs=5", "model.swa_start=2", "model.rank=3"])
    return cfg, train_model(cfg, digits_splits["train"], digits_splits["val"], quiet=True)


@pytest.fixture(scope="module")
def trained_cnn(digits_splits):
    cfg = load_config([*TINY, "model=swag", "model.arch=cnn", "model.conv_channels=[4]", "model.hidden_sizes=[16]",
                   "train.epochs=4", "model.swa_start=2", "model.rank=3", "model.bn_rows=300"])
    return cfg, train_model(cfg, digits_splits["train"], digits_splits["val"], quiet=True)


def test_a_row_gets_the_same_samples_alone_or_in_a_batch(trained_mlp, digits_splits):
    cfg, result = trained_mlp
    x = torch.as_tensor(digits_splits["test"].x[:40])
    batch = predict_log_probs(result.model, x, 12, seed=7)
    alone = predict_log_probs(result.model, x[9:10], 12, seed=7)
    split = predict_log_probs(result.model, x, 12, seed=7, batch_size=16)
    torch.testing.assert_close(alone[:, 0], batch[:, 9], atol=1e-5, rtol=0)
    torch.testing.assert_close(split, batch, atol=1e-5, rtol=0)
    assert batch.exp().std(0).max() > 1e-3  # the samples differ: a posterior, not one network
    assert not torch.allclose(batch, predict_log_probs(result.model, x, 12, seed=8))


def test_the_trained_net_is_the_swa_mean_and_swa_only_predicts_with_it(trained_mlp, digits_splits):
    cfg, result = trained_mlp
    model = result.model
    assert torch.equal(parameters_to_vector(model.net.parameters()), model.mean)
    x = torch.as_tensor(digits_splits["test"].x[:10])
    model.swa_only = True
    try:
        out = predict_log_probs(model, x, 4, seed=1)
    finally:
        model.swa_only = False
    with torch.no_grad():
        expected = torch.log_softmax(model.net.eval()(x), -1)
    torch.testing.assert_close(out, expected.expand(4, -1, -1))
    assert FAMILY.features(model, x).shape == (10, 64)


@pytest.mark.parametrize("which", ["trained_mlp", "trained_cnn"])
def test_bundle_round_trip_predicts_exactly_the_same(which, request, digits_splits, tmp_path):
    cfg, result = request.getfixturevalue(which)
    save_bundle(result.model, cfg, digits_splits["train"].schema, tmp_path)
    loaded, loaded_cfg, _, _ = load_bundle(tmp_path)
    x = digits_splits["test"].x[:50]
    assert torch.equal(served_log_probs(loaded, x, loaded_cfg), served_log_probs(result.model, x, cfg))


def test_batchnorm_statistics_are_refreshed_for_each_sample(trained_cnn, digits_splits):
    cfg, result = trained_cnn
    model = result.model
    assert model.bn_mean.shape[0] == cfg.evaluate.mc_samples
    assert (model.bn_mean[0] - model.bn_mean[1]).abs().max() > 1e-4
    assert (model.bn_var[0] - model.bn_var[1]).abs().max() > 1e-4
    # sample 2's statistics are those of its weights, over the chosen training rows
    from dl_uncertainty.families.swag import _bn_rows

    work = copy.deepcopy(model.net).train()
    vector_to_parameters(model.weights(cfg.seed, 2), work.parameters())
    bns = [m for m in work.modules() if isinstance(m, _BatchNorm)]
    for bn in bns:
        bn.reset_running_stats()
        bn.momentum = None
    with torch.no_grad():
        for batch in _bn_rows(digits_splits["train"], 300, cfg.seed, torch.device("cpu")).split(cfg.train.batch_size):
            work(batch)
    torch.testing.assert_close(model.bn_mean[2], torch.cat([bn.running_mean for bn in bns]))
    torch.testing.assert_close(model.bn_var[2], torch.cat([bn.running_var for bn in bns]))
    x = torch.as_tensor(digits_splits["test"].x[:8])
    with pytest.raises(UserError, match="model.bn_samples"):
        predict_log_probs(model, x, cfg.evaluate.mc_samples + 1)


def test_reloading_the_best_epoch_keeps_the_moments_collected_after_it(tiny_cfg):
    cfg = tiny_cfg("model=swag", "model.swa_start=1", "model.hidden_sizes=[4]", "train.epochs=6")
    model = build_model(cfg.model, [5], 3)
    _snapshots(model, cfg, 2)
    best = copy.deepcopy(model.state_dict())  # what the loop keeps for the best val NLL, here epoch 2
    seen = _snapshots(model, cfg, 4, seed=1)
    moments = {k: getattr(model, k).clone() for k in ("mean", "sq_mean", "dev", "count")}
    model.load_state_dict(best)
    assert int(model.count) == 6
    assert all(torch.equal(getattr(model, k), v) for k, v in moments.items())
    assert all(torch.equal(p, best[f"net.{name}"]) for name, p in model.net.named_parameters())
    assert not torch.equal(parameters_to_vector(model.net.parameters()), seen[-1])
    fresh = build_model(cfg.model, [5], 3)  # a fresh build (a bundle, a resume) takes the moments it is given
    fresh.load_state_dict(best)
    assert int(fresh.count) == 2


def test_training_with_early_stopping_keeps_every_collected_snapshot(tiny_cfg, digits_splits):
    cfg = tiny_cfg("model=swag", "train.epochs=12", "train.early_stopping_patience=3", "train.lr=0.05",
                   "model.swa_start=2", "model.rank=3")
    result = train_model(cfg, digits_splits["train"], digits_splits["val"], quiet=True)
    assert result.best_epoch < result.epochs_run  # the best epoch's state_dict was reloaded
    assert int(result.model.count) == result.epochs_run - 1  # still every snapshot of epochs 2..last


def test_resume_gives_the_same_model_as_an_uninterrupted_run(tiny_cfg, digits_splits, tmp_path):
    train, val = digits_splits["train"], digits_splits["val"]
    over = ["model=swag", "model.swa_start=1", "model.rank=3"]
    straight = train_model(tiny_cfg(*over, "train.epochs=4"), train, val, checkpoint_dir=tmp_path / "a", quiet=True)
    train_model(tiny_cfg(*over, "train.epochs=2"), train, val, checkpoint_dir=tmp_path / "b", quiet=True)
    resumed = train_model(tiny_cfg(*over, "train.epochs=4", "train.resume=true"), train, val,
                          checkpoint_dir=tmp_path / "b", quiet=True)
    assert int(resumed.model.count) == 4
    for (name, a), b in zip(straight.model.state_dict().items(), resumed.model.state_dict().values(), strict=True):
        assert torch.equal(a, b), name


def test_bad_configs_fail_with_one_error_naming_the_key(tiny_cfg, digits_splits):
    for bad in ("model.rank=1", "model.rank=0"):
        with pytest.raises(UserError, match="model.rank"):
            build_model(tiny_cfg("model=swag", bad).model, [64], 8)
    with pytest.raises(UserError, match=r"model.swa_start=4 .*after the last epoch \(train.epochs=3\)"):
        train_model(tiny_cfg("model=swag", "model.swa_start=4"), digits_splits["train"], digits_splits["val"],
                    quiet=True)
