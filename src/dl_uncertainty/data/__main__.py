"""Dataset helpers on the command line.

    python -m dl_uncertainty.data upload table.csv s3://datasets/table.csv
"""

from __future__ import annotations

from pathlib import Path

from dl_uncertainty.data.s3 import upload_file
from dl_uncertainty.errors import UserError

# ---------------------------------------------------------------- command line


def main(argv: list[str] | None = None) -> int:
    """``python -m dl_uncertainty.data upload table.csv s3://datasets/table.csv``"""
    import argparse
    import sys

    parser = argparse.ArgumentParser(prog="python -m dl_uncertainty.data", description="Dataset helpers.")
    sub = parser.add_subparsers(dest="command", required=True)
    upload = sub.add_parser("upload", help="put a CSV/NPZ file at s3://bucket/key (e.g. MinIO's datasets bucket)",
                            description="Endpoint from AWS_ENDPOINT_URL (or MLFLOW_S3_ENDPOINT_URL), "
                                        "credentials from the standard AWS variables.")
    upload.add_argument("file", help="local .csv or .npz file")
    upload.add_argument("uri", help="destination, s3://bucket/key")
    args = parser.parse_args(argv)
    try:
        if Path(args.file).suffix.lower() not in (".csv", ".npz"):
            raise UserError(f"{args.file}: only .csv and .npz files can be used as data_source")
        upload_file(args.file, args.uri)
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"uploaded {args.file} -> {args.uri}; use it with data_source={args.uri}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
