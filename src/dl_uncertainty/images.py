"""Image data helpers on the command line.

    python -m dl_uncertainty.images make-shapes data/shapes   # 3 classes of drawn shapes
"""

from __future__ import annotations

from dl_uncertainty.data.shapes import PER_CLASS, make_shapes


def _positive(text: str) -> int:
    import argparse

    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number of at least 1")
    return int(text)


def main(argv: list[str] | None = None) -> int:
    import argparse

    parser = argparse.ArgumentParser(prog="python -m dl_uncertainty.images", description="Image data helpers.")
    sub = parser.add_subparsers(dest="command", required=True)
    shapes = sub.add_parser("make-shapes", help="write circle/square/triangle PNGs, one folder per class")
    shapes.add_argument("folder")
    shapes.add_argument("--per-class", type=_positive, default=PER_CLASS, help=f"images per class (default {PER_CLASS})")
    shapes.add_argument("--size", type=_positive, default=32, help="side in pixels (default 32)")
    shapes.add_argument("--seed", type=int, default=0, help="default 0")
    args = parser.parse_args(argv)
    folder = make_shapes(args.folder, args.per_class, args.size, args.seed)
    print(f"{3 * args.per_class} images in {folder}; use them with data=image_folder data.path={folder}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
