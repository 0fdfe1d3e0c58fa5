"""What each training option computes: focal loss, mixup, cutmix, and the BNN's ELBO data term."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from dl_uncertainty.config.compose import load_config
from dl_uncertainty.errors import UserError
from dl_uncertainty.families.base import build_model as get_model
from dl_uncertainty.families.losses import Mix, cutmix, focal_loss, mix_batch, mixed_loss
from dl_uncertainty.training.loop import loss_terms, train_model


@pytest.fixture()
def batch():
    gen = torch.Generator().manual_seed(0)
    return torch.randn(32, 5, generator=gen) * 3, torch.randint(5, (32,), generator=gen)


@pytest.mark.parametrize("smoothing", [0.0, 0.1])
def test_focal_with_gamma_zero_is_cross_entropy(batch, smoothing):
    logits, y = batch
    assert float(focal_loss(logits, y, gamma=0.0, label_smoothing=smoothing)) == pytest.approx(
        float(F.cross_entropy(logits, y, label_smoothing=smoothing)), rel=1e-6)


def test_focal_is_the_papers_formula(batch):
    logits, y = batch
    p_t = torch.softmax(logits.double(), -1)[torch.arange(len(y)), y].numpy()
    expected = np.mean(-0.25 * (1 - p_t) ** 2 * np.log(p_t))
    assert float(focal_loss(logits, y, gamma=2.0, alpha=0.25)) == pytest.approx(expected, rel=1e-5)
    # confident right answers weigh less than under cross-entropy
    assert float(focal_loss(logits, y, gamma=2.0)) < float(F.cross_entropy(logits, y))


def test_mixup_loss_is_the_lam_weighted_loss_of_both_targets(batch):
    logits, y = batch
    partner = y.flip(0)
    cfg = load_config(["train.label_smoothing=0.0"]).train
    loss = mixed_loss(logits, y, Mix(torch.empty(0), partner, 0.3), cfg)
    expected = 0.3 * F.cross_entropy(logits, y) + 0.7 * F.cross_entropy(logits, partner)
    assert float(loss) == pytest.approx(float(expected), rel=1e-6)
    soft = 0.3 * F.one_hot(y, 5).float() + 0.7 * F.one_hot(partner, 5).float()
    assert float(loss) == pytest.approx(float(F.cross_entropy(logits, soft)), rel=1e-6)


def test_mixup_mixes_inputs_with_the_partners_of_the_labels():
    torch.manual_seed(1)
    y = torch.arange(16) % 4
    x = y[:, None].float().repeat(1, 6)  # each row says its label
    mix = mix_batch(x, y, load_config(["train.mixup_prob=1", "train.mixup_alpha=0.4"]).train, [6])
    assert 0 < mix.lam < 1
    expected = mix.lam * y.float() + (1 - mix.lam) * mix.y_partner.float()
    assert torch.allclose(mix.x, expected[:, None].expand(-1, 6), atol=1e-6)


@pytest.mark.parametrize("lam", [0.05, 0.3, 0.5, 0.77, 0.99])
def test_cutmix_box_area_matches_lam(lam):
    gen = torch.Generator().manual_seed(int(lam * 100))
    for _ in range(20):
        mixed, kept = cutmix(torch.zeros(2, 3 * 16 * 12), torch.ones(2, 3 * 16 * 12), [3, 16, 12], lam, gen)
        pasted = mixed.reshape(2, 3, 16, 12)
        assert float(pasted.mean()) == pytest.approx(1 - kept)  # the pasted share is exactly 1 - lam
        rows, cols = pasted[0, 0].nonzero(as_tuple=True)
        if len(rows):  # one solid box, the same in every channel
            assert len(rows) == (rows.max() - rows.min() + 1) * (cols.max() - cols.min() + 1)
            assert torch.equal(pasted[:, 0], pasted[:, 2])
    unclipped, kept = cutmix(torch.zeros(1, 100 * 100), torch.ones(1, 100 * 100), [1, 100, 100], 0.75,
                             torch.Generator().manual_seed(5))
    assert kept >= 0.75 - 0.02  # the box is ~(1 - lam) of the image, less where it is clipped


def test_cutmix_through_mix_batch_labels_match_the_pasted_area():
    torch.manual_seed(3)
    y = torch.arange(8)
    x = (y[:, None].float() + 1).repeat(1, 64)
    mix = mix_batch(x, y, load_config(["train.cutmix_prob=1.0"]).train, [1, 8, 8])
    for row, label, partner in zip(mix.x, y, mix.y_partner, strict=True):
        if label != partner:
            assert float((row == partner + 1).float().mean()) == pytest.approx(1 - mix.lam)


def test_cutmix_needs_images():
    with pytest.raises(UserError, match="train.cutmix_prob > 0 needs image data"):
        load_config(["data=csv", "data.path=t.csv", "train.cutmix_prob=0.5"])
    with pytest.raises(UserError, match="image data"):
        mix_batch(torch.zeros(4, 6), torch.zeros(4, dtype=torch.long),
                  load_config(["train.cutmix_prob=0.5"]).train, [6])


def _kind(mix: Mix | None) -> str:
    """What a batch of constant rows (row i holds i + 1) went through, read from the pixels."""
    if mix is None:
        return "none"
    whole = torch.equal(mix.x, mix.x.round())  # cutmix pastes pixels; mixup blends them
    return "cutmix" if whole else "mixup"


@pytest.mark.parametrize(("mixup", "cutmix"), [(0.3, 0.0), (0.0, 0.4), (0.3, 0.2), (0.5, 0.5)])
def test_each_option_mixes_its_share_of_batches_and_never_both(mixup, cutmix):
    torch.manual_seed(7)
    cfg = load_config([f"train.mixup_prob={mixup}", f"train.cutmix_prob={cutmix}"]).train
    x, y = (torch.arange(16)[:, None].float() + 1).repeat(1, 64), torch.arange(16)
    kinds = [_kind(mix_batch(x, y, cfg, [1, 8, 8])) for _ in range(3000)]
    shares = {k: kinds.count(k) / len(kinds) for k in ("mixup", "cutmix", "none")}
    assert shares["mixup"] == pytest.approx(mixup, abs=0.03)
    assert shares["cutmix"] == pytest.approx(cutmix, abs=0.03)
    assert shares["none"] == pytest.approx(1 - mixup - cutmix, abs=0.03)


def test_defaults_are_plain_cross_entropy_and_draw_no_random_numbers(tiny_cfg, batch):
    cfg = tiny_cfg("model=mc_dropout_dnn", "model.dropout=0.1")
    x, y = torch.randn(8, 64), torch.randint(8, (8,))
    state = torch.get_rng_state()
    assert mix_batch(x, y, cfg.train, [1, 8, 8]) is None
    assert torch.equal(state, torch.get_rng_state())
    logits, labels = batch
    assert torch.equal(mixed_loss(logits, labels, None, cfg.train), F.cross_entropy(logits, labels))


def test_the_bnn_elbo_uses_the_configured_data_loss(tiny_cfg, digits_splits):
    cfg = tiny_cfg("model=bnn", "train.loss=focal", "train.focal_gamma=1.5", "train.label_smoothing=0.05")
    train = digits_splits["train"]
    model = get_model(cfg.model, train.schema.feature_shape, len(train.schema.class_names))
    x, y = torch.as_tensor(train.x[:32]), torch.as_tensor(train.y[:32])
    with torch.no_grad():
        torch.manual_seed(0)
        terms = loss_terms(model, x, y, cfg, kl_w=1e-3)
        torch.manual_seed(0)  # the same weight sample
        expected = focal_loss(model(x), y, gamma=1.5, label_smoothing=0.05)
    assert float(terms["nll"]) == pytest.approx(float(expected), rel=1e-6)
    assert float(terms["loss"]) == pytest.approx(float(expected + 1e-3 * terms["kl"]), rel=1e-6)


@pytest.mark.parametrize("option", [
    ["model=bnn", "train.loss=focal"],
    ["model=mc_dropout_dnn", "train.mixup_prob=0.5"],
    ["model=deep_ensemble", "model.ensemble_size=2", "train.cutmix_prob=0.3", "train.mixup_prob=0.3"],
])
def test_every_option_trains(tiny_cfg, digits_splits, option):
    result = train_model(tiny_cfg(*option, "train.epochs=6"), digits_splits["train"], digits_splits["val"],
                         quiet=True)
    assert result.best["val_acc"] > 0.85
