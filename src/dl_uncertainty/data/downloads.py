"""MNIST, Fashion-MNIST and CIFAR-10 in their original files, downloaded once into a cache folder.

Each file is checked against its published MD5 before it is read. ``data.urls`` points a dataset
at a mirror (``{mnist: https://..., fashion_mnist: file:///...}``); a mirror with other files sets
``data.checksums`` (``{"mnist/train-images-idx3-ubyte.gz": <md5>, ...}``). A failed download says
where to put the file by hand.
"""

from __future__ import annotations

import gzip
import hashlib
import os
import pickle
import tarfile
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
from omegaconf import DictConfig

from dl_uncertainty.errors import UserError

IDX_FILES = ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz",
             "t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz")
CIFAR10_FILE = "cifar-10-python.tar.gz"

BENCHMARKS = {
    "mnist": {
        "url": "https://ossci-datasets.s3.amazonaws.com/mnist",
        "md5": dict(zip(IDX_FILES, ("f68b3c2dcbeaaa9fbdd348bbdeb94873", "d53e105ee54ea40749a09fcbcd1e9432",
                                    "9fb629c4189551a2d022fa330f9573f3", "ec29112dd5afa0611ce80d1b7f02629c"),
                        strict=True)),
        "classes": [str(i) for i in range(10)],
    },
    "fashion_mnist": {
        "url": "https://raw.githubusercontent.com/zalandoresearch/fashion-mnist/master/data/fashion",
        "md5": dict(zip(IDX_FILES, ("8d4fb7e6c68d591d4c3dfef9ec88bf0d", "25c81989df183df01b3e8a0aad5dffbe",
                                    "bef4ecab320f06d8554ea6380940ec79", "bb300cfdad3c16e7a12a480ee83cd310"),
                        strict=True)),
        "classes": ["t-shirt", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag",
                    "ankle-boot"],
    },
    "cifar10": {
        "url": "https://www.cs.toronto.edu/~kriz",
        "md5": {CIFAR10_FILE: "c58f30108f718f92721af3b95e74349a"},
        "classes": ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"],
    },
}

Images = tuple[np.ndarray, np.ndarray]  # uint8 [N, C, H, W], class names [N]


def _md5(path: Path) -> str:
    digest = hashlib.md5(usedforsecurity=False)  # integrity against the published checksums only
    with path.open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def fetch(name: str, file: str, cfg: DictConfig) -> Path:
    """``<cache_dir>/<name>/<file>``, downloaded from ``data.urls[name]`` (or the official URL) if absent."""
    folder = Path(os.path.expanduser(cfg.cache_dir)) / name
    path = folder / file
    url = f"{cfg.urls.get(name, BENCHMARKS[name]['url']).rstrip('/')}/{file}"
    expected = cfg.checksums.get(f"{name}/{file}", BENCHMARKS[name]["md5"][file])
    by_hand = f"download it by other means and put it at {path}"
    if not path.is_file():
        try:
            folder.mkdir(parents=True, exist_ok=True)
            partial = path.with_name(f".{file}.partial")
            print(f"downloading {url} -> {path}")
            with urllib.request.urlopen(url, timeout=60) as response, partial.open("wb") as out:
                while block := response.read(1 << 20):
                    out.write(block)
            os.replace(partial, path)
        except (urllib.error.URLError, OSError, ValueError) as err:
            reason = getattr(err, "reason", None) or err
            raise UserError(f"cannot download {url} ({reason}); {by_hand}") from None
    if _md5(path) != expected:
        path.replace(path.with_name(f"{file}.bad-checksum"))
        raise UserError(f"{path} (from {url}) does not have the published MD5 {expected}; it was moved aside "
                        f"to {file}.bad-checksum; {by_hand}")
    return path


def fetch_all(name: str, cfg: DictConfig) -> list[Path]:
    known = [f"{n}/{file}" for n, benchmark in BENCHMARKS.items() for file in benchmark["md5"]]
    unknown = sorted(set(cfg.checksums) - set(known))
    if unknown:  # a misspelt key would leave the published MD5 in force, and the mirror's file refused
        raise UserError(f"data.checksums names {unknown}, which is no benchmark file; its keys are "
                        f"<benchmark>/<file>, one of: {', '.join(known)}")
    return [fetch(name, file, cfg) for file in BENCHMARKS[name]["md5"]]


def read_idx(path: Path, dims: int) -> np.ndarray:
    """An IDX file of unsigned bytes (magic 0x0000080<dims>), gzip-compressed."""
    try:
        raw = gzip.decompress(path.read_bytes())
    except (OSError, EOFError) as err:
        raise UserError(f"{path} is not a gzip file: {err}") from None
    magic = int.from_bytes(raw[:4], "big")
    if magic != 0x800 + dims:
        raise UserError(f"{path} is not an IDX file of {dims}-d unsigned bytes (magic {magic:#010x})")
    shape = tuple(int.from_bytes(raw[4 + 4 * i: 8 + 4 * i], "big") for i in range(dims))
    body = np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * dims)
    if body.size != np.prod(shape):
        raise UserError(f"{path} holds {body.size} bytes but its header says {shape}")
    return body.reshape(shape)


def _load_idx(name: str, cfg: DictConfig) -> tuple[Images, Images]:
    classes = np.array(BENCHMARKS[name]["classes"])
    parts = []
    for prefix in ("train", "t10k"):
        images = read_idx(fetch(name, f"{prefix}-images-idx3-ubyte.gz", cfg), 3)
        labels = read_idx(fetch(name, f"{prefix}-labels-idx1-ubyte.gz", cfg), 1)
        if len(images) != len(labels) or labels.max(initial=0) >= len(classes):
            raise UserError(f"{name} {prefix}: {len(images)} images but {len(labels)} labels, or labels beyond 9")
        parts.append((images[:, None], classes[labels]))
    return parts[0], parts[1]


class _ArraysOnly(pickle.Unpickler):
    """CIFAR-10's batches are pickles: allow numpy arrays in them, never arbitrary objects."""

    ALLOWED = {("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
               ("numpy", "ndarray"), ("numpy", "dtype"), ("numpy.core.multiarray", "scalar"),
               ("numpy._core.multiarray", "scalar"), ("_codecs", "encode")}

    def find_class(self, module: str, name: str):
        if (module, name) not in self.ALLOWED:
            raise pickle.UnpicklingError(f"{module}.{name} is not allowed in a CIFAR-10 batch")
        return super().find_class(module, name)


def _cifar_batch(archive: tarfile.TarFile, member: str, path: Path) -> Images:
    try:
        batch = _ArraysOnly(archive.extractfile(f"cifar-10-batches-py/{member}"), encoding="bytes").load()
        data = np.asarray(batch[b"data"], dtype=np.uint8).reshape(-1, 3, 32, 32)
        labels = np.asarray(batch[b"labels"], dtype=np.int64)
    except (KeyError, IndexError, TypeError, ValueError, AttributeError, pickle.UnpicklingError, EOFError) as err:
        raise UserError(f"{path}: cifar-10-batches-py/{member} is not a CIFAR-10 batch ({err})") from None
    return data, np.array(BENCHMARKS["cifar10"]["classes"])[labels]


def _load_cifar10(cfg: DictConfig) -> tuple[Images, Images]:
    path = fetch("cifar10", CIFAR10_FILE, cfg)
    try:
        with tarfile.open(path, "r:gz") as archive:
            train = [_cifar_batch(archive, f"data_batch_{i}", path) for i in range(1, 6)]
            test = _cifar_batch(archive, "test_batch", path)
    except (tarfile.TarError, OSError) as err:
        raise UserError(f"{path} is not the CIFAR-10 python tarball: {err}") from None
    return (np.concatenate([t[0] for t in train]), np.concatenate([t[1] for t in train])), test


def load_benchmark(name: str, cfg: DictConfig) -> tuple[Images, Images]:
    """The official (train, test) images and class names of ``name``."""
    if name not in BENCHMARKS:
        raise UserError(f"unknown benchmark {name!r}: use one of {', '.join(BENCHMARKS)}")
    return _load_cifar10(cfg) if name == "cifar10" else _load_idx(name, cfg)

