"""What the up-front image check costs: ``check_source`` (header, ``verify()``, and a decode only of a
JPEG that lacks its end-of-image marker) against the header-and-verify check alone (the baseline,
which misses truncated JPEGs) and against decoding every file (which finds them all, at full cost).

    .venv/bin/python benchmarks/image_precheck.py [--images 2000] [--size 256] [--repeats 5]

All three run in this process on the same generated JPEG folder, in rotating order; medians are shown.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

from dl_uncertainty.config.compose import load_config
from dl_uncertainty.data.images import check_source, list_images


def make_folder(root: Path, images: int, size: int) -> Path:
    rng = np.random.default_rng(0)
    base = rng.integers(0, 255, (size, size, 3), dtype=np.uint8)
    for i in range(images):
        folder = root / ("a" if i % 2 else "b")
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.roll(base, i, axis=1)).save(folder / f"{i}.jpg", quality=90)
    return root


def verify_only(files: list[str]) -> None:
    for path in files:
        with Image.open(path) as image:
            image.verify()


def decode_all(files: list[str]) -> None:
    for path in files:
        with Image.open(path) as image:
            image.load()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=2000)
    parser.add_argument("--size", type=int, default=256, help="width and height of each JPEG")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = make_folder(Path(tmp), args.images, args.size)
        cfg = load_config(["data=image_folder", f"data.path={root}"]).data
        files = [f for f, _ in list_images(cfg)]
        runs = {"verify only (baseline)": lambda: verify_only(files), "check_source": lambda: check_source(cfg),
                "decode every file": lambda: decode_all(files)}
        times: dict[str, list[float]] = {name: [] for name in runs}
        for repeat in range(args.repeats):
            names = list(runs)[repeat % len(runs):] + list(runs)[:repeat % len(runs)]
            for name in names:
                start = time.perf_counter()
                runs[name]()
                times[name].append(time.perf_counter() - start)
    base = statistics.median(times["verify only (baseline)"])
    print(f"{args.images} JPEGs of {args.size}x{args.size}, median of {args.repeats}")
    print(f"{'check':26s} {'s':>8s} {'ms/1000 img':>12s} {'x baseline':>11s}")
    for name, values in times.items():
        median = statistics.median(values)
        print(f"{name:26s} {median:8.3f} {median / args.images * 1e6:12.1f} {median / base:11.2f}")


if __name__ == "__main__":
    main()
