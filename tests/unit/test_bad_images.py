"""Images a new user could bring: deeper than 8 bits, truncated, empty, looping, mixed; each is read
correctly or refused in one line naming the file."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from dl_uncertainty.config.compose import load_config
from dl_uncertainty.data.images import check_source
from dl_uncertainty.data.tables import prepare
from dl_uncertainty.errors import UserError


def image_cfg(path, *overrides):
    return load_config(["data=image_folder", f"data.path={path}", "data.image_size=null", *overrides]).data


def gradient(seed: int, size: int = 16) -> np.ndarray:
    """Values spanning the whole 0..65535 range, shifted per image."""
    ramp = np.linspace(0, 65535, size * size).reshape(size, size)
    return np.roll(ramp, seed, axis=1).astype(np.uint16)


def folder_of(tmp_path, save, per_class: int = 6):
    for label in ("a", "b"):
        (tmp_path / "imgs" / label).mkdir(parents=True)
        for i in range(per_class):
            save(tmp_path / "imgs" / label, i + (0 if label == "a" else 7))
    return tmp_path / "imgs"


def pixels(split) -> np.ndarray:
    from dl_uncertainty.data.rows import to_images

    return to_images(split.x, split.schema) * 255


def test_sixteen_bit_pngs_are_scaled_to_eight_bits_not_clipped(tmp_path):
    root = folder_of(tmp_path, lambda d, i: Image.fromarray(gradient(i)).save(d / f"{i}.png"))
    assert Image.open(next((root / "a").iterdir())).mode == "I;16"
    splits = prepare(image_cfg(root), seed=0)
    values = np.rint(np.concatenate([pixels(s) for s in splits.values() if len(s.y)]))
    assert values.min() == 0 and values.max() == 255
    most_common = np.bincount(values.astype(int).ravel()).max() / values.size
    assert most_common < 0.05  # clipped at 255, 97-100 % of the pixels were one value
    expected = np.rint(gradient(0) / 257)  # image a/0.png, wherever it went
    assert any(np.abs(p[0] - expected).max() < 0.6 for p in np.concatenate([pixels(s) for s in splits.values()]))


def test_thirty_two_bit_and_float_tiffs_are_scaled_by_their_range(tmp_path):
    root = folder_of(tmp_path, lambda d, i: Image.fromarray(
        gradient(i).astype(np.int32) if d.name == "a" else (gradient(i) / 65535).astype(np.float32)).save(d / f"{i}.tif"))
    assert {Image.open(next((root / c).iterdir())).mode for c in "ab"} == {"I", "F"}
    splits = prepare(image_cfg(root), seed=0)
    values = np.rint(np.concatenate([pixels(s) for s in splits.values() if len(s.y)]))
    assert values.min() == 0 and values.max() == 255 and len(np.unique(values)) > 200


@pytest.mark.parametrize("array, needle", [
    (np.full((16, 16), 70000, np.int32), r"32-bit integer image with values from 70000 to 70000.*8- or 16-bit PNG"),
    (np.full((16, 16), 3.5, np.float32), r"floating-point image with values from 3.5 to 3.5.*\[0, 1\]"),
])
def test_deep_images_out_of_range_are_refused_naming_the_file(tmp_path, array, needle):
    root = folder_of(tmp_path, lambda d, i: Image.fromarray(gradient(i)).save(d / f"{i}.png"))
    Image.fromarray(array).save(root / "b" / "odd.tif")
    with pytest.raises(UserError, match=r"odd.tif is a " + needle):
        prepare(image_cfg(root), seed=0)
