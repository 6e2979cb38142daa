"""A data source, parsed once: what ``data.source`` names, as one typed value every stage uses.

The source string a user writes (a file, a folder, a glob, an ``s3://`` prefix, or nothing for a
workload's packaged default) is interpreted here and nowhere else: the preflight checks, the data
stage's cache key (``fingerprint``), the filesystem infra builds for it (``infra.storage``) and the
workload's reader all take the same ``DataSource``.
"""

from __future__ import annotations

import glob as globlib
import hashlib
from collections.abc import Callable
from pathlib import Path
from typing import Literal
from urllib.parse import urlparse

from pydantic import BaseModel, ConfigDict

from tuning_core.errors import ConfigError

GLOB_CHARS = "*?["


class DataSource(BaseModel):
    """Where a workload's input is.

    Attributes:
        kind: "local" (a file, folder or glob on this machine), "s3" (a key, prefix or glob in a bucket)
            or "packaged" (a file shipped with an installed package: the workload's default).
        uri: the source as users see it: an absolute local path or ``s3://bucket/key``.
        path: the source as a path inside its filesystem: the absolute local path or ``bucket/key``.
        glob: whether ``path`` holds a wildcard (``*``, ``?``, ``[``).
    """

    model_config = ConfigDict(frozen=True)

    kind: Literal["local", "s3", "packaged"]
    uri: str
    path: str
    glob: bool = False

    @classmethod
    def parse(cls, text: str | None, packaged: Callable[[], str] | None = None,
              where: str = "data.source") -> DataSource:
        """Parse what the user wrote; None (or empty) means the workload's ``packaged`` default.

        Raises:
            ConfigError: no source and no default, or an ``s3://`` URI without a bucket.
        """
        if not text:
            if packaged is None:
                raise ConfigError(f"{where}: not set, expected a file, folder, glob or s3:// prefix")
            path = str(Path(packaged()).resolve())
            return cls(kind="packaged", uri=path, path=path)
        if text.startswith("s3://"):
            parsed = urlparse(text)
            if not parsed.netloc:
                raise ConfigError(f"{where} {text!r}: expected s3://bucket[/prefix]")
            path = f"{parsed.netloc}/{parsed.path.strip('/')}".rstrip("/")
            return cls(kind="s3", uri=f"s3://{path}", path=path, glob=_has_glob(path))
        path = str(Path(text).expanduser().resolve())
        return cls(kind="local", uri=path, path=path, glob=_has_glob(path))

    @property
    def is_s3(self) -> bool:
        return self.kind == "s3"

    def local_files(self) -> list[Path]:
        """The local files the source names (a file, every file below a folder, a glob's matches); [] for S3."""
        if self.is_s3:
            return []
        p = Path(self.path)
        if self.glob:
            files = [Path(f) for f in globlib.glob(self.path, recursive=True)]
        elif p.is_dir():
            files = list(p.rglob("*"))
        else:
            files = [p]
        return sorted(f for f in files if f.is_file())

    def fingerprint(self) -> str | None:
        """Size and mtime of the local files: a cache key part that changes when they do. None for S3
        (re-read on every run: listing a bucket's objects is what reading them would cost) and for a
        source that names no file (the data stage then reports what is missing)."""
        stats = [f"{f}:{f.stat().st_size}:{f.stat().st_mtime_ns}" for f in self.local_files()]
        return hashlib.sha256("|".join(stats).encode()).hexdigest()[:16] if stats else None


def _has_glob(path: str) -> bool:
    return any(c in path for c in GLOB_CHARS)
