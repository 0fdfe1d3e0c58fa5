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


def test_empty_non_image_and_oversized_files_are_named_with_the_fix(tmp_path):
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    bomb = (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", 30000, 30000, 8, 0, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(b"\0" * 100)) + chunk(b"IEND", b""))  # a header claiming 900 M pixels
    cases = [(lambda root: (root / "a" / "z.png").write_bytes(b""), r"z.png is an empty file \(0 bytes\); copy it "
              r"again or remove it$"),
             (lambda root: (root / "a" / "notes.png").write_text("hi"), r"notes.png is not a readable image "
              r"\(PNG/JPEG\); remove it or replace it$"),
             (lambda root: (root / "a" / "bomb.png").write_bytes(bomb), r"bomb.png is too large to decode safely "
              r"\(.*900000000 pixels.*\); shrink it or remove it$")]
    for i, (damage, message) in enumerate(cases):
        root = folder_of(tmp_path / str(i), lambda d, i: Image.fromarray(gradient(i)).save(d / f"{i}.png"))
        damage(root)
        for step in (check_source, lambda c: prepare(c, seed=0)):
            with pytest.raises(UserError, match=message):
                step(image_cfg(root))


def test_symlink_loops_and_dangling_links_do_not_hang_or_count(tmp_path):
    root = folder_of(tmp_path, lambda d, i: Image.fromarray(gradient(i)).save(d / f"{i}.png"))
    (root / "a" / "up").symlink_to("..")  # a loop: a/up/a/up/...
    (root / "a" / "l1.png").symlink_to("l2.png")
    (root / "a" / "l2.png").symlink_to("l1.png")
    (root / "b" / "gone.png").symlink_to(tmp_path / "nowhere.png")
    splits = prepare(image_cfg(root), seed=0)
    assert sum(len(s.y) for s in splits.values()) == 12


def test_mixed_modes_become_the_first_images_channels(tmp_path):
    root = folder_of(tmp_path, lambda d, i: Image.new("RGB", (16, 16), (i * 20, 0, 0)).save(d / f"{i}.png"))
    rng = np.random.default_rng(0)
    for i, mode in enumerate(["L", "RGBA", "P", "1", "LA"]):
        Image.fromarray(rng.integers(0, 255, (16, 16, 3), dtype=np.uint8)).convert(mode).save(root / "a" / f"m{i}.png")
    Image.fromarray(rng.integers(0, 255, (16, 16, 3), dtype=np.uint8)).convert("CMYK").save(root / "b" / "c.jpg")
    splits = prepare(image_cfg(root), seed=0)
    assert splits["train"].schema.feature_shape == [3, 16, 16] and sum(len(s.y) for s in splits.values()) == 18


def test_an_image_size_beyond_memory_is_refused_before_decoding(tmp_path):
    root = folder_of(tmp_path, lambda d, i: Image.fromarray(gradient(i)).save(d / f"{i}.png"))
    cfg = image_cfg(root, "data.image_size=[100000,100000]")
    for step in (check_source, lambda c: prepare(c, seed=0)):
        with pytest.raises(UserError, match=r"^data.image_size=\[100000, 100000\] for 12 images needs about \d+ GiB of "
                                            r"memory, more than this machine's \d+ GiB; lower data.image_size$"):
            step(cfg)


def test_a_truncated_jpeg_is_named_as_truncated_before_any_task_and_by_preprocess(tmp_path):
    root = folder_of(tmp_path, lambda d, i: Image.fromarray(
        np.random.default_rng(i).integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(d / f"{i}.jpg"))
    raw = (root / "a" / "0.jpg").read_bytes()
    (root / "a" / "0.jpg").write_bytes(raw[: len(raw) - 2000])  # its headers whole, its pixels cut
    (root / "b" / "7.jpg").write_bytes((root / "b" / "7.jpg").read_bytes() + b"\0" * 300)  # padded after its end: valid
    for step in (check_source, lambda c: prepare(c, seed=0)):  # run-local's pre-check, and preprocess itself
        with pytest.raises(UserError, match=r"0.jpg is truncated: the file ends before its image does .*; copy it "
                                            r"again or remove it$"):
            step(image_cfg(root))
    (root / "a" / "0.jpg").write_bytes(raw)
    assert len(check_source(image_cfg(root))) == 12


# ---------------------------------------------------------------- data.checksums from the command line


MD5 = "0123456789abcdef0123456789abcdef"


@pytest.mark.parametrize("override", [
    f"data.checksums={{mnist/train-images-idx3-ubyte.gz:{MD5},mnist/t10k-labels-idx1-ubyte.gz:'{MD5}'}}",
    f"data.checksums={{\"mnist/train-images-idx3-ubyte.gz\":{MD5},'mnist/t10k-labels-idx1-ubyte.gz':{MD5}}}",
    f"+data.checksums={{mnist/train-images-idx3-ubyte.gz:{MD5},mnist/t10k-labels-idx1-ubyte.gz:{MD5}}}",
])
def test_checksums_are_settable_from_the_command_line(override):
    cfg = load_config(["data=mnist", override])
    assert dict(cfg.data.checksums) == {"mnist/train-images-idx3-ubyte.gz": MD5, "mnist/t10k-labels-idx1-ubyte.gz": MD5}


@pytest.mark.parametrize(("override", "message"), [
    ("data.checksums={mnist/a.gz:xyz}", r"data.checksums\['mnist/a.gz'\] must be an MD5 \(32 hex digits\), got 'xyz'"),
    (f"data.checksums={{mnst/a.gz:{MD5}}}", r"data.checksums key 'mnst/a.gz' must be <benchmark>/<file>"),
])
def test_bad_checksums_name_the_key(override, message):
    with pytest.raises(UserError, match=message):
        load_config(["data=mnist", override])


def test_a_checksum_for_no_benchmark_file_is_refused_before_downloading(tmp_path):
    cfg = load_config(["data=mnist", f"data.cache_dir={tmp_path}", f"data.checksums={{mnist/train.gz:{MD5}}}"])
    with pytest.raises(UserError, match=r"data.checksums names \['mnist/train.gz'\], which is no benchmark file; its "
                                        r"keys are <benchmark>/<file>, one of: mnist/train-images-idx3-ubyte.gz"):
        check_source(cfg.data)
    assert not any(tmp_path.iterdir())


def test_the_readme_command_for_a_mirror_with_its_own_checksums_runs(tmp_path):
    """The README's exact syntax, through bash: a file:// mirror whose files differ from the published ones."""
    import gzip
    import hashlib
    import struct

    mirror = tmp_path / "mirror"
    mirror.mkdir()
    sums = []
    rng = np.random.default_rng(0)
    for prefix, n in (("train", 40), ("t10k", 20)):
        labels = np.arange(n) % 10
        for name, array in ((f"{prefix}-images-idx3-ubyte.gz", rng.integers(0, 255, (n, 28, 28))),
                            (f"{prefix}-labels-idx1-ubyte.gz", labels)):
            header = struct.pack(">I", 0x800 + array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
            (mirror / name).write_bytes(gzip.compress(header + array.astype(np.uint8).tobytes()))
            sums.append(f"mnist/{name}:{hashlib.md5((mirror / name).read_bytes()).hexdigest()}")
    command = (f"{sys.executable} -m dl_uncertainty.preprocess data=mnist data.far_ood=null data.val_fraction=0.25 data.calib_fraction=0.25 "
               f"data.cache_dir={tmp_path / 'cache'} data_dir={tmp_path / 'out'} "
               f"\"data.urls={{mnist:'file://{mirror}'}}\" \"data.checksums={{{','.join(sums)}}}\"")
    from tests.conftest import REPO

    proc = subprocess.run(["bash", "-c", command], capture_output=True, text=True, timeout=180,
                          env={"PYTHONPATH": f"{REPO / 'src'}:{REPO}", "PATH": "/usr/bin:/bin"})
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "out" / "train.npz").is_file()
