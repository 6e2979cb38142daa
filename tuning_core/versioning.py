"""Content-addressed, atomic multi-file versions over a pyarrow filesystem.

A version is a folder ``<root>/data/<dataset>/<hash>/`` with its files and a
``manifest.json``. The manifest is written LAST: a folder without a manifest is not a
version (a crash mid-write leaves only invisible leftovers, which the next write of the
same content overwrites). This gives all-or-nothing versions on object stores that have
no atomic folder rename.
"""

from __future__ import annotations

import hashlib
import io
import json
from collections.abc import Callable
from typing import Any

import pyarrow.fs as pafs

MANIFEST = "manifest.json"


def hash_bytes(*chunks: bytes) -> str:
    h = hashlib.sha256()
    for c in chunks:
        h.update(c)
    return h.hexdigest()[:16]


def version_exists(fs: pafs.FileSystem, folder: str) -> bool:
    return fs.get_file_info(f"{folder}/{MANIFEST}").type == pafs.FileType.File


def read_manifest(fs: pafs.FileSystem, folder: str) -> dict[str, Any]:
    with fs.open_input_stream(f"{folder}/{MANIFEST}") as f:
        return json.loads(f.read().decode())


def write_version(
    fs: pafs.FileSystem,
    folder: str,
    files: dict[str, Callable[[io.BufferedIOBase], None]],
    manifest: dict[str, Any],
) -> None:
    """Write ``files`` (name → writer taking a binary stream) into ``folder``, then the manifest.

    If anything fails before the manifest, the partial files are removed (best effort) and
    the error propagates: the version does not exist.
    """
    if isinstance(fs, pafs.LocalFileSystem):
        fs.create_dir(folder, recursive=True)
    try:
        for name, writer in files.items():
            with fs.open_output_stream(f"{folder}/{name}") as out:
                writer(out)
        body = json.dumps(manifest, indent=2, sort_keys=True, default=str).encode()
        with fs.open_output_stream(f"{folder}/{MANIFEST}") as out:
            out.write(body)
    except BaseException:
        try:
            fs.delete_dir(folder)
        except OSError:
            pass
        raise
