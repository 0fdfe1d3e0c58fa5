"""Image data: folders, CSVs, the benchmark files in their original formats, and bad input."""

from __future__ import annotations

import gzip
import hashlib
import io
import pickle
import shutil
import struct
import subprocess
import sys
import tarfile

import numpy as np
import pytest
import torch
from PIL import Image

from dl_uncertainty.config.compose import load_config
from dl_uncertainty.data.augment import augment
from dl_uncertainty.data.images import check_source
from dl_uncertainty.data.rows import to_images
from dl_uncertainty.data.shapes import make_shapes
from dl_uncertainty.data.splits import load_split, save_split
from dl_uncertainty.data.tables import prepare
from dl_uncertainty.errors import UserError

SHAPES = ["circle", "square", "triangle"]


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    return make_shapes(tmp_path_factory.mktemp("shapes"), per_class=12, size=16)


def image_cfg(path, *overrides):
    return load_config(["data=image_folder", f"data.path={path}", *overrides]).data


def test_image_folder_becomes_normalised_stratified_splits(shapes):
    cfg = image_cfg(shapes, "data.image_size=[12,10]")
    splits = prepare(cfg, seed=0)
    train = splits["train"]
    assert train.schema.class_names == SHAPES and train.schema.feature_shape == [3, 12, 10]
    assert sum(len(s.y) for s in splits.values()) == 36 and len(splits["ood"].y) == 0
    assert set(splits["test"].y) == {0, 1, 2}
    channel_means = train.x.reshape(len(train.x), 3, -1).mean(axis=(0, 2))
    np.testing.assert_allclose(channel_means, 0, atol=1e-4)  # fitted on train
    pixels = to_images(splits["test"].x, train.schema)
    assert pixels.min() >= -1e-5 and pixels.max() <= 1 + 1e-5  # back in [0, 1]
    first = np.asarray(Image.open(sorted((shapes / "circle").iterdir())[0]).convert("RGB").resize((10, 12), Image.Resampling.BILINEAR))
    assert any(np.abs(p.transpose(1, 2, 0) * 255 - first).max() < 1 for p in to_images(
        np.concatenate([s.x for s in splits.values()]), train.schema))


def test_csv_of_paths_grayscale_given_stats_and_held_out_class(shapes, tmp_path):
    rows = [f"{shapes}/{c}/{c}_{i:04d}.png,{c}" for c in SHAPES for i in range(12)]
    (tmp_path / "list.csv").write_text("path,label\n" + "\n".join(rows) + "\n")
    cfg = image_cfg(tmp_path / "list.csv", "data.channels=1", "data.image_size=null", "data.mean=[0.5]",
                    "data.std=[0.25]", "data.ood_classes=[triangle]")
    splits = prepare(cfg, seed=0)
    assert splits["train"].schema.class_names == ["circle", "square"]
    assert splits["ood"].schema.ood_class_names == ["triangle"] and len(splits["ood"].y) == 12
    assert splits["train"].schema.feature_shape == [1, 16, 16]
    assert splits["train"].schema.cleaning["center"][0] == 0.5


def _copy(shapes, tmp_path):
    root = tmp_path / "data"
    shutil.copytree(shapes, root)
    return root


@pytest.mark.parametrize("damage, message", [
    (lambda root: (root / "empty").mkdir(), "class folder .*empty has no images"),
    (lambda root: (root / "circle" / "notes.jpg").write_text("hello"), r"notes.jpg is not a readable image"),
    (lambda root: (root / "square" / "cut.png").write_bytes((root / "square" / "square_0000.png").read_bytes()[:60]),
     r"cut.png is truncated: the file ends before its image does"),
    (lambda root: [shutil.rmtree(root / c) for c in ("square", "triangle")], "at least two classes.*found: circle"),
    (lambda root: Image.new("RGB", (20, 16)).save(root / "triangle" / "wide.png"),
     r"images differ in size: .*circle_0000.png is 16x16, .*wide.png is 20x16; set data.image_size"),
])
def test_bad_image_folders_are_one_line_errors_in_the_pre_check_and_in_preprocess(shapes, tmp_path, damage, message):
    root = _copy(shapes, tmp_path)
    damage(root)
    cfg = image_cfg(root, "data.image_size=null")
    for step in (check_source, lambda c: prepare(c, seed=0)):  # before any task, and in the task itself
        with pytest.raises(UserError, match=message) as err:
            step(cfg)
        assert "\n" not in str(err.value) and "BytesIO" not in str(err.value)


def test_mixed_sizes_are_resized_when_asked(shapes, tmp_path):
    root = _copy(shapes, tmp_path)
    Image.new("L", (40, 30), 200).save(root / "triangle" / "big.png")
    splits = prepare(image_cfg(root, "data.image_size=[8,8]", "data.workers=2"), seed=0)
    assert splits["train"].schema.feature_shape == [3, 8, 8]
    assert sum(len(s.y) for s in splits.values()) == 37


def test_augmentation_flips_and_shifts_each_image():
    images = torch.arange(2 * 4 * 5, dtype=torch.float32).view(2, 1, 4, 5) + 1
    flat = images.reshape(2, -1)
    torch.manual_seed(0)
    flips = [augment(flat, [1, 4, 5], True, 0).view(2, 1, 4, 5) for _ in range(20)]
    for out in flips:
        for i in range(2):
            assert torch.equal(out[i], images[i]) or torch.equal(out[i], images[i].flip(-1))
    assert any(not torch.equal(out, images) for out in flips)
    for _ in range(20):
        out = augment(flat, [1, 4, 5], False, 2).view(2, 1, 4, 5)
        for i in range(2):
            padded = torch.nn.functional.pad(images[i], (2, 2, 2, 2))
            assert any(torch.equal(out[i], padded[:, dy:dy + 4, dx:dx + 5]) for dy in range(5) for dx in range(5))


# ---------------------------------------------------------------- benchmark files, original formats


def idx_gz(array: np.ndarray) -> bytes:
    """IDX as LeCun describes it: magic 0x00000800 + ndim (unsigned bytes), big-endian dims, data."""
    header = struct.pack(">I", 0x800 + array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    return gzip.compress(header + array.astype(np.uint8).tobytes())


def write_idx_mirror(folder, seed):
    rng = np.random.default_rng(seed)
    folder.mkdir()
    md5 = {}
    for prefix, n in (("train", 40), ("t10k", 20)):
        labels = np.arange(n) % 10
        images = rng.integers(0, 60, (n, 28, 28))
        for k in range(10):  # a bright bar whose row says the class
            images[labels == k, 2 + 2 * k, 4:24] = 250
        for name, array in ((f"{prefix}-images-idx3-ubyte.gz", images), (f"{prefix}-labels-idx1-ubyte.gz", labels)):
            (folder / name).write_bytes(idx_gz(array))
            md5[name] = hashlib.md5((folder / name).read_bytes()).hexdigest()
    return md5


def benchmark_overrides(tmp_path, name, md5s: dict[str, dict[str, str]]):
    urls = ",".join(f"{k}:'file://{tmp_path / k}'" for k in md5s)
    sums = ",".join(f"{k}/{f}:{v}" for k, files in md5s.items() for f, v in files.items())
    return [f"data={name}", f"data.cache_dir={tmp_path / 'cache'}", f"+data.urls={{{urls}}}",
            f"+data.checksums={{{sums}}}", "data.val_fraction=0.25", "data.calib_fraction=0.25"]


def test_mnist_and_fashion_mnist_files_are_downloaded_checked_and_paired(tmp_path):
    md5s = {"mnist": write_idx_mirror(tmp_path / "mnist", 0),
            "fashion_mnist": write_idx_mirror(tmp_path / "fashion_mnist", 1)}
    cfg = load_config(benchmark_overrides(tmp_path, "mnist", md5s))
    splits = prepare(cfg.data, cfg.seed)
    assert (tmp_path / "cache" / "mnist" / "t10k-images-idx3-ubyte.gz").is_file()
    assert len(splits["test"].y) == 20 and sum(len(splits[k].y) for k in ("train", "val", "calib")) == 40
    assert splits["train"].schema.feature_shape == [1, 28, 28]
    assert splits["train"].schema.class_names == [str(i) for i in range(10)]
    ood = splits["ood"]
    assert ood.schema.far_ood == "fashion_mnist" and ood.far_x.shape == (20, 784)
    save_split(ood, tmp_path / "ood.npz")
    np.testing.assert_array_equal(load_split(tmp_path / "ood.npz").far_x, ood.far_x)
    shutil.rmtree(tmp_path / "mnist")  # the cache is used from now on: no download
    fashion = load_config(benchmark_overrides(tmp_path, "fashion_mnist", md5s))
    assert prepare(fashion.data, 0)["train"].schema.class_names[0] == "t-shirt"


def test_resnet_learns_mnist_files_and_reports_grad_cam_and_far_ood(tmp_path):
    from dl_uncertainty.reports.evaluation import evaluate_model
    from dl_uncertainty.training.loop import train_model

    md5s = {"mnist": write_idx_mirror(tmp_path / "mnist", 0),
            "fashion_mnist": write_idx_mirror(tmp_path / "fashion_mnist", 1)}
    cfg = load_config([*benchmark_overrides(tmp_path, "mnist", md5s),
                       "model=mc_dropout_dnn", "model.arch=resnet", "model.conv_channels=[8,8]", "train.epochs=2",
                       "train.lr=0.01", "train.batch_size=8", "evaluate.mc_samples=4", "train.val_mc_samples=2"])
    assert cfg.model.arch == "resnet" and load_config(benchmark_overrides(tmp_path, "mnist", md5s)).model.arch == "cnn"
    splits = prepare(cfg.data, cfg.seed)
    result = train_model(cfg, splits["train"], splits["val"], quiet=True)
    ev = evaluate_model(result.model, cfg, splits["test"], splits["ood"], splits["val"])
    assert {"saliency", "most_uncertain", "shift"} <= set(ev.figures)
    np.testing.assert_array_equal(ev.predictions["far_ood_x"], splits["ood"].far_x)  # Fashion-MNIST, not noise
    assert 0 <= ev.metrics["far_auroc_entropy"] <= 1


def test_idx_files_decode_to_the_written_pixels_and_labels_in_order(tmp_path):
    from dl_uncertainty.data.downloads import BENCHMARKS, load_benchmark

    rng = np.random.default_rng(3)
    (tmp_path / "mnist").mkdir()
    written, md5 = {}, {}
    for prefix, n in (("train", 7), ("t10k", 5)):
        written[prefix] = rng.integers(0, 256, (n, 28, 28)), rng.integers(0, 10, n)
        for name, array in zip((f"{prefix}-images-idx3-ubyte.gz", f"{prefix}-labels-idx1-ubyte.gz"), written[prefix],
                               strict=True):
            (tmp_path / "mnist" / name).write_bytes(idx_gz(array))
            md5[name] = hashlib.md5((tmp_path / "mnist" / name).read_bytes()).hexdigest()
    cfg = load_config(benchmark_overrides(tmp_path, "mnist", {"mnist": md5}))
    train, test = load_benchmark("mnist", cfg.data)
    classes = np.array(BENCHMARKS["mnist"]["classes"])
    for (pixels, labels), prefix in ((train, "train"), (test, "t10k")):
        assert pixels.dtype == np.uint8 and pixels.shape == (len(written[prefix][0]), 1, 28, 28)
        np.testing.assert_array_equal(pixels[:, 0], written[prefix][0])
        np.testing.assert_array_equal(labels, classes[written[prefix][1]])


def test_cifar10_tarball_is_read(tmp_path):
    rng = np.random.default_rng(0)
    buffer = io.BytesIO()
    written = {}
    with tarfile.open(fileobj=buffer, mode="w:gz") as archive:
        for member in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
            images, labels = rng.integers(0, 256, (4, 3, 32, 32), dtype=np.uint8), rng.integers(0, 10, 4)
            written[member] = images, labels
            # the published layout: each row is 1024 red, then 1024 green, then 1024 blue values, row-major
            rows = np.stack([np.concatenate([image[0].ravel(), image[1].ravel(), image[2].ravel()])
                             for image in images])
            batch = {b"batch_label": member.encode(), b"labels": [int(v) for v in labels],
                     b"data": rows, b"filenames": [b"x.png"] * 4}
            body = pickle.dumps(batch, protocol=2)
            info = tarfile.TarInfo(f"cifar-10-batches-py/{member}")
            info.size = len(body)
            archive.addfile(info, io.BytesIO(body))
    (tmp_path / "cifar10").mkdir()
    (tmp_path / "cifar10" / "cifar-10-python.tar.gz").write_bytes(buffer.getvalue())
    md5 = {"cifar10": {"cifar-10-python.tar.gz": hashlib.md5(buffer.getvalue()).hexdigest()}}
    cfg = load_config([*benchmark_overrides(tmp_path, "cifar10", md5), "data.val_fraction=0.25",
                       "data.ood_classes=[]"])
    from dl_uncertainty.data.downloads import load_benchmark

    (train_x, train_y), (test_x, test_y) = load_benchmark("cifar10", cfg.data)
    assert train_x.shape == (20, 3, 32, 32) and test_x.shape == (4, 3, 32, 32)
    classes = np.array(["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"])
    batches = [written[f"data_batch_{i}"] for i in range(1, 6)]
    np.testing.assert_array_equal(train_x, np.concatenate([b[0] for b in batches]))
    np.testing.assert_array_equal(train_y, classes[np.concatenate([b[1] for b in batches])])
    np.testing.assert_array_equal(test_x, written["test_batch"][0])
    np.testing.assert_array_equal(test_y, classes[written["test_batch"][1]])


def test_failed_download_names_the_url_and_where_to_put_the_file(tmp_path):
    cfg = load_config(["data=mnist", f"data.cache_dir={tmp_path}", f"+data.urls={{mnist:'file://{tmp_path}/none'}}"])
    with pytest.raises(UserError, match=rf"cannot download file://{tmp_path}/none/train-images-idx3-ubyte.gz "
                                        rf".*put it at {tmp_path}/mnist/train-images-idx3-ubyte.gz"):
        prepare(cfg.data, 0)


def test_wrong_checksum_is_refused(tmp_path):
    write_idx_mirror(tmp_path / "mirror", 0)  # the right format, but not the published files
    cfg = load_config(["data=mnist", f"data.cache_dir={tmp_path / 'cache'}",
                       f"+data.urls={{mnist:'file://{tmp_path / 'mirror'}'}}"])
    with pytest.raises(UserError, match=r"from file://.*train-images-idx3-ubyte.gz\) does not have the published "
                                        r"MD5 f68b3c2dcbeaaa9fbdd348bbdeb94873.*put it at") as err:
        prepare(cfg.data, 0)
    assert "\n" not in str(err.value)
    assert not (tmp_path / "cache" / "mnist" / "train-images-idx3-ubyte.gz").exists()


@pytest.mark.parametrize(("overrides", "needle"), [
    (["data=image_folder"], "data.path is required"),
    (["data=mnist", "data.image_size=[0,3]"], "data.image_size"),
    (["data=mnist", "data.channels=2"], "data.channels"),
    (["data=mnist", "data.far_ood=svhn"], "data.far_ood"),
    (["data=mnist", "data.mean=[0.5]"], "data.mean and data.std"),
    (["data=cifar10", "data.crop_padding=-1"], "data.crop_padding"),
    (["data=mnist", "+data.urls.svhn=file:///x"], "data.urls"),
    (["data=mnist", "model.arch=vit"], "model.arch"),
    (["data=mnist", "data.hflips=true"], "hflips"),
])
def test_bad_image_config_is_a_user_error_naming_the_key(overrides, needle):
    with pytest.raises(UserError, match=needle.replace(".", r"\.").replace("[", r"\[")) as err:
        load_config(overrides)
    assert "\n" not in str(err.value)


def test_image_configs_default_to_the_resnet_and_tables_to_the_mlp():
    assert load_config(["data=cifar10", "model=deep_ensemble"]).model.arch == "resnet"
    assert load_config(["data=mnist", "model=bnn", "model.arch=cnn"]).model.arch == "cnn"
    assert load_config(["model=mc_dropout_dnn"]).model.arch == "mlp"


def test_preprocess_cli_says_a_bad_image_folder_in_one_line(shapes, tmp_path):
    root = _copy(shapes, tmp_path)
    (root / "square" / "square_0003.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    proc = subprocess.run([sys.executable, "-m", "dl_uncertainty.preprocess", "data=image_folder",
                           f"data.path={root}", f"data_dir={tmp_path / 'out'}"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and "square_0003.png is not a readable image" in lines[0]
    assert not (tmp_path / "out" / "train.npz").exists()


def test_unreachable_download_server_names_the_url(tmp_path):
    import socket

    with socket.socket() as sock:  # a port nobody listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    cfg = load_config(["data=cifar10", f"data.cache_dir={tmp_path}", f"+data.urls.cifar10=http://127.0.0.1:{port}/c"])
    with pytest.raises(UserError, match=rf"cannot download http://127.0.0.1:{port}/c/cifar-10-python.tar.gz "
                                        r"\(.*refused.*\); download it by other means and put it at "):
        prepare(cfg.data, 0)


def test_make_shapes_cli_writes_each_class_and_refuses_a_count_below_one(tmp_path):
    cli = [sys.executable, "-m", "dl_uncertainty.images", "make-shapes"]
    done = subprocess.run([*cli, str(tmp_path / "s"), "--per-class", "4", "--size", "8"], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert {p.name: len(list(p.iterdir())) for p in (tmp_path / "s").iterdir()} == dict.fromkeys(SHAPES, 4)
    assert Image.open(next((tmp_path / "s" / "circle").iterdir())).size == (8, 8)
    refused = subprocess.run([*cli, str(tmp_path / "t"), "--per-class", "0"], capture_output=True, text=True)
    assert refused.returncode == 2 and "'0' is not a whole number of at least 1" in refused.stderr.splitlines()[-1]
    assert not (tmp_path / "t").exists()
