"""A large split streams from disk: memory-mapped, batched by a DataLoader, same training as in memory."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from dl_uncertainty.config.compose import load_config
from dl_uncertainty.data.shapes import make_shapes
from dl_uncertainty.data.splits import load_split, save_split
from dl_uncertainty.data.tables import prepare
from dl_uncertainty.families.predict import predict_log_probs
from dl_uncertainty.training import loop as training

TINY = ["train.epochs=2", "train.early_stopping_patience=0", "train.val_mc_samples=2", "train.batch_size=16",
        "model=mc_dropout_dnn", "model.arch=cnn", "model.conv_channels=[4]", "model.hidden_sizes=[16]"]


@pytest.fixture(scope="module")
def shape_files(tmp_path_factory):
    folder = make_shapes(tmp_path_factory.mktemp("shapes"), per_class=12, size=12)
    cfg = load_config(["data=image_folder", f"data.path={folder}", "data.image_size=[12,12]"])
    splits = prepare(cfg.data, cfg.seed)
    out = tmp_path_factory.mktemp("splits")
    for name in ("train", "val"):
        save_split(splits[name], out / f"{name}.npz")
    return folder, out


def _cfg(folder, *overrides):
    return load_config([*TINY, "data=image_folder", f"data.path={folder}", "data.image_size=[12,12]",
                        "data.hflip=true", "data.crop_padding=2", *overrides])


def test_a_split_loads_memory_mapped_with_the_same_values(shape_files):
    _, out = shape_files
    mapped, loaded = load_split(out / "train.npz", mmap=True), load_split(out / "train.npz")
    assert isinstance(mapped.x, np.memmap) and not mapped.x.flags.writeable
    assert not isinstance(loaded.x, np.memmap)
    np.testing.assert_array_equal(mapped.x, loaded.x)
    np.testing.assert_array_equal(mapped.y, loaded.y)


@pytest.mark.parametrize(("stream", "max_mb", "expected"), [
    ("auto", 0, True), ("auto", 2048, False), ("true", 2048, True), ("false", 0, False)])
def test_auto_streams_only_a_split_above_the_size_limit(shape_files, stream, max_mb, expected):
    folder, out = shape_files
    cfg = _cfg(folder, f"data.stream={stream}", f"data.in_memory_max_mb={max_mb}")
    assert training.streams(cfg.data, load_split(out / "train.npz", mmap=True).x) is expected


@pytest.mark.parametrize("workers", [0, 1])
def test_streamed_training_reads_batches_from_the_memmap_and_ends_with_the_same_weights(
        shape_files, monkeypatch, workers):
    folder, out = shape_files
    train, val = load_split(out / "train.npz", mmap=True), load_split(out / "val.npz")
    in_memory = training.train_model(_cfg(folder, "data.stream=false"), train, val, quiet=True)

    gathered = []
    original = training._Batches.__getitem__

    def spy(self, i):
        assert isinstance(self.x, np.memmap)  # never a copy of the whole split
        xb, yb = original(self, i)
        gathered.append(len(yb))
        return xb, yb

    monkeypatch.setattr(training._Batches, "__getitem__", spy)
    streamed = training.train_model(_cfg(folder, "data.stream=true", f"data.workers={workers}"), train, val,
                                    quiet=True)
    if workers == 0:  # a worker process's calls are not seen here
        assert max(gathered) == 16 and sum(gathered) == 2 * len(train.y)
    assert streamed.history == in_memory.history
    for (name, a), b in zip(in_memory.model.state_dict().items(), streamed.model.state_dict().values(), strict=True):
        assert torch.equal(a, b), name


def test_mc_prediction_of_a_memmap_equals_that_of_the_array(shape_files):
    folder, out = shape_files
    train = load_split(out / "train.npz", mmap=True)
    model = training.train_model(_cfg(folder, "train.epochs=1"), train, load_split(out / "val.npz"),
                                 quiet=True).model
    a = predict_log_probs(model, train.x, 3, batch_size=7, seed=1)
    b = predict_log_probs(model, np.array(train.x), 3, batch_size=7, seed=1)
    assert torch.equal(a, b)
