"""Table files that arrive packed: gzip, bz2 and xz are read through; ZIP archives of one file too;
a spreadsheet workbook is named as one, with how to save it as a table."""

from __future__ import annotations

import bz2
import gzip
import io
import lzma
import zipfile

from dl_uncertainty.errors import UserError

COMPRESSED = {b"\x1f\x8b": ("gzip", gzip.decompress), b"BZh": ("bz2", bz2.decompress),
              b"\xfd7zXZ\x00": ("xz", lzma.decompress)}
SAVE_AS = "save it as CSV (or Parquet) and set data.path to that file"


def unpacked(raw: bytes, path: str) -> bytes:
    """The bytes of the table inside ``raw``: itself, or unpacked; UserError for what holds no one table."""
    for magic, (kind, unpack) in COMPRESSED.items():
        if raw.startswith(magic):
            try:
                return unpack(raw)
            except (OSError, EOFError, ValueError, lzma.LZMAError) as err:
                raise UserError(f"{path} is {kind}-compressed but cannot be unpacked ({err}); check the file") from None
    if raw.startswith(b"\xd0\xcf\x11\xe0"):  # OLE2: Excel 97-2003 (and other Office files)
        raise UserError(f"{path} is an Excel 97-2003 workbook (or another Office file), not a table; {SAVE_AS}")
    if raw.startswith(b"PK\x03\x04"):
        try:
            archive = zipfile.ZipFile(io.BytesIO(raw))
        except (zipfile.BadZipFile, OSError, EOFError):
            return raw  # not a readable archive after all: the CSV reader names it a binary file
        return _zip_member(archive, path)
    return raw


def _zip_member(archive: zipfile.ZipFile, path: str) -> bytes:
    names = [n for n in archive.namelist() if not n.endswith("/") and not n.split("/")[-1].startswith(".")
             and not n.startswith("__MACOSX/")]
    if any(n.startswith("xl/") for n in names):
        raise UserError(f"{path} is an Excel workbook (.xlsx), not a table; {SAVE_AS}")
    if any(n in ("content.xml", "mimetype") for n in names):
        raise UserError(f"{path} is an OpenDocument file (.ods), not a table; {SAVE_AS}")
    if len(names) != 1:
        raise UserError(f"{path} is a ZIP archive of {len(names)} files ({', '.join(names[:5])}); unpack it and set "
                        "data.path to the table")
    try:
        return archive.read(names[0])
    except (zipfile.BadZipFile, OSError, EOFError, RuntimeError) as err:  # RuntimeError: encrypted
        raise UserError(f"{path} is a ZIP archive whose {names[0]} cannot be read ({err}); unpack it yourself") from None
