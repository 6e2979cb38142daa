"""Storage adapter: one storage root (a local folder or s3://bucket/prefix) and ONE endpoint
setting that feeds boto3, pyarrow's S3FileSystem, Ray Tune's storage and MLflow.

tuning_core receives ``Storage.fs`` (a pyarrow filesystem) and paths inside it; it never sees
boto3 or credentials.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

import pyarrow.fs as pafs

from infra.settings import Settings, get_settings
from tuning_core.errors import ServiceUnavailable, StorageError, storage_failure
from tuning_core.sources import DataSource

# boto3 >= 1.36 sends CRC checksums that some S3-compatible servers reject; ask only when required.
_CHECKSUM_ENV = {
    "AWS_REQUEST_CHECKSUM_CALCULATION": "when_required",
    "AWS_RESPONSE_CHECKSUM_VALIDATION": "when_required",
}


@dataclass(frozen=True)
class Storage:
    """A filesystem plus the root path inside it.

    Attributes:
        fs: pyarrow filesystem (LocalFileSystem or S3FileSystem).
        root: the root as a path inside ``fs`` ("/abs/folder" or "bucket/prefix").
        uri: the root as a URI users see ("/abs/folder" or "s3://bucket/prefix").
    """

    fs: pafs.FileSystem
    root: str
    uri: str

    @property
    def is_s3(self) -> bool:
        return self.uri.startswith("s3://")

    def fs_for_ray(self, settings: Settings) -> pafs.FileSystem:
        """The filesystem handed to Ray Tune: without keys (see ``s3_filesystem``).

        Ray workers get the keys through their environment: inherited from this process for a
        local Ray, or through ``runtime_env`` when joining a cluster (``infra.ray_cluster``).
        """
        return s3_filesystem(settings, with_keys=False) if self.is_s3 else self.fs

    def path(self, *parts: str) -> str:
        return "/".join([self.root.rstrip("/"), *[p.strip("/") for p in parts if p]])

    def instance_id(self) -> str:
        """A random id stored at the root once; a wiped or different root gets a new one.

        Cache keys include it, so a cached stage result never points into a storage root that
        no longer holds what the result describes.
        """
        import uuid

        marker = self.path(".tunepipe-id")
        try:
            # Only a marker that is really absent makes a new id: an unreachable or refusing store
            # must fail (retryably when down), not silently change every cache key.
            if self.fs.get_file_info(marker).type != pafs.FileType.NotFound:
                with self.fs.open_input_stream(marker) as f:
                    return f.read().decode().strip()
            if isinstance(self.fs, pafs.LocalFileSystem):
                self.fs.create_dir(self.root, recursive=True)
            ident = uuid.uuid4().hex
            with self.fs.open_output_stream(marker) as out:
                out.write(ident.encode())
            return ident
        except OSError as err:
            message = f"storage root {redact(self.uri)}: id marker cannot be read or written ({_short(err)})"
            raise storage_failure(message, err) from None

    def to_uri(self, path: str) -> str:
        """Turn a path inside ``fs`` into the URI that Ray, MLflow and users understand."""
        return f"s3://{path}" if self.is_s3 else path


def split_s3_uri(uri: str) -> tuple[str, str]:
    parsed = urlparse(uri)
    if parsed.scheme != "s3" or not parsed.netloc:
        raise StorageError(f"storage URI {uri!r}: expected s3://bucket[/prefix]")
    return parsed.netloc, parsed.path.strip("/")


def s3_filesystem(settings: Settings, with_keys: bool = True) -> pafs.S3FileSystem:
    """pyarrow's S3 filesystem on the shared endpoint.

    ``with_keys=False`` leaves the credentials to the AWS default chain (environment, profile,
    instance role) of whichever process uses the filesystem: Ray Tune pickles the filesystem into
    the experiment state it stores on S3, so the one handed to Ray must not carry the keys.
    """
    kwargs: dict[str, object] = {"region": settings.aws_region}
    if settings.s3_endpoint_url:
        ep = urlparse(settings.s3_endpoint_url)
        kwargs["endpoint_override"] = ep.netloc or ep.path
        kwargs["scheme"] = ep.scheme or "https"
    if with_keys and settings.aws_access_key_id and settings.aws_secret_access_key:
        kwargs["access_key"] = settings.aws_access_key_id.get_secret_value()
        kwargs["secret_key"] = settings.aws_secret_access_key.get_secret_value()
    # Fail fast instead of pyarrow's default of retrying for minutes against a dead endpoint;
    # stage retries (Prefect) are the place to wait for an endpoint to come back.
    kwargs["retry_strategy"] = pafs.AwsStandardS3RetryStrategy(max_attempts=3)
    kwargs["connect_timeout"] = 5
    kwargs["request_timeout"] = 30
    return pafs.S3FileSystem(**kwargs)


def boto3_client(settings: Settings | None = None):
    """A boto3 S3 client on the shared endpoint setting (the only place boto3 is built)."""
    import boto3
    from botocore.config import Config

    settings = settings or get_settings()
    for k, v in _CHECKSUM_ENV.items():
        os.environ.setdefault(k, v)
    return boto3.client(
        "s3",
        endpoint_url=settings.s3_endpoint_url,
        region_name=settings.aws_region,
        aws_access_key_id=settings.aws_access_key_id.get_secret_value() if settings.aws_access_key_id else None,
        aws_secret_access_key=(
            settings.aws_secret_access_key.get_secret_value() if settings.aws_secret_access_key else None
        ),
        config=Config(retries={"max_attempts": 3, "mode": "standard"}, connect_timeout=5, read_timeout=30),
    )


def mlflow_s3_env(settings: Settings) -> dict[str, str]:
    """Environment MLflow's S3 artifact client needs to reach the same endpoint."""
    env = dict(_CHECKSUM_ENV)
    if settings.s3_endpoint_url:
        env["MLFLOW_S3_ENDPOINT_URL"] = settings.s3_endpoint_url
    return env


def source_filesystem(source: DataSource, settings: Settings | None = None, with_keys: bool = True) -> pafs.FileSystem:
    """The filesystem that reads a data source (``source.path`` is the path inside it); ``with_keys``
    as for ``s3_filesystem``."""
    return s3_filesystem(settings or get_settings(), with_keys) if source.is_s3 else pafs.LocalFileSystem()


def filesystem_for(uri: str, settings: Settings | None = None) -> tuple[pafs.FileSystem, str]:
    """A filesystem and the path inside it for any local path or s3:// URI."""
    settings = settings or get_settings()
    if uri.startswith("s3://"):
        bucket, prefix = split_s3_uri(uri)
        return s3_filesystem(settings), f"{bucket}/{prefix}".rstrip("/")
    return pafs.LocalFileSystem(), str(Path(uri).expanduser().resolve())


def build_storage(settings: Settings | None = None, root: str | None = None) -> Storage:
    """Build the storage root from settings (or an explicit ``root``) and check it is usable."""
    settings = settings or get_settings()
    uri = root or settings.storage
    fs, path = filesystem_for(uri, settings)
    if isinstance(fs, pafs.S3FileSystem):
        bucket = path.split("/", 1)[0]
        check_bucket(fs, bucket, uri)
        return Storage(fs=fs, root=path, uri=f"s3://{path}")
    return Storage(fs=fs, root=path, uri=path)


def check_bucket(fs: pafs.FileSystem, bucket: str, uri: str) -> None:
    """Raise a one-line StorageError if the bucket is missing or the credentials are wrong."""
    try:
        info = fs.get_file_info(bucket)
    except OSError as err:
        text = _short(err)
        denied = ("AccessDenied", "ACCESS_DENIED", "InvalidAccessKeyId", "SignatureDoesNotMatch", "403")
        if any(s in text for s in denied):
            raise StorageError(f"storage {uri}: access to bucket {bucket!r} denied; check the S3 credentials "
                               "(AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY)") from None
        raise ServiceUnavailable(f"storage {uri}: cannot reach bucket {bucket!r} ({text})") from None
    if info.type == pafs.FileType.NotFound:
        raise StorageError(f"storage {uri}: bucket {bucket!r} does not exist; create it first")


def _short(err: Exception) -> str:
    """First line of an error, without anything that looks like a credential."""
    text = str(err).splitlines()[0] if str(err) else type(err).__name__
    return redact(text)


# "scheme://user:password@": a URI that carries its credentials (e.g. a basic-auth MLflow server).
_URI_PASSWORD = re.compile(r"([a-zA-Z][\w+.-]*://[^/:@\s]*):[^@/\s]*@")


def redact(text: str, settings: Settings | None = None) -> str:
    """``text`` with the S3 keys from settings and any password inside a URI masked."""
    settings = settings or get_settings()
    text = _URI_PASSWORD.sub(r"\1:***@", text)
    for secret in (settings.aws_secret_access_key, settings.aws_access_key_id):
        if secret is not None and secret.get_secret_value():
            text = text.replace(secret.get_secret_value(), "***")
    return text
