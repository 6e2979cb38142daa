"""Integration fixtures: a real SeaweedFS S3 server for the session, started the way the local stack
starts it (loopback only, generated credentials that it enforces, bucket created)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pytest


@dataclass(frozen=True)
class S3Server:
    """A running SeaweedFS S3 endpoint.

    Attributes:
        endpoint: "http://127.0.0.1:<port>".
        access_key, secret_key: the only credentials it accepts.
        bucket: an existing bucket ("tunepipe").
        region: region name clients should sign with.
        state_dir: the stack folder it runs from (logs/s3.log has its output).
    """

    endpoint: str
    access_key: str
    secret_key: str
    bucket: str
    region: str
    state_dir: Path

    @property
    def env(self) -> dict[str, str]:
        """Variables pointing settings, boto3, pyarrow and subprocesses at this server."""
        return {
            "AWS_ENDPOINT_URL_S3": self.endpoint,
            "AWS_ACCESS_KEY_ID": self.access_key,
            "AWS_SECRET_ACCESS_KEY": self.secret_key,
            "AWS_DEFAULT_REGION": self.region,
            "AWS_REQUEST_CHECKSUM_CALCULATION": "when_required",
            "AWS_RESPONSE_CHECKSUM_VALIDATION": "when_required",
            "TUNEPIPE_STORAGE": f"s3://{self.bucket}/root",
        }

    def settings(self, storage: str | None = None):
        """Settings for this server; ``storage`` overrides the root (default s3://<bucket>/root)."""
        from infra.settings import Settings

        return Settings(
            storage=storage or f"s3://{self.bucket}/root",
            s3_endpoint_url=self.endpoint,
            aws_access_key_id=self.access_key,
            aws_secret_access_key=self.secret_key,
            aws_region=self.region,
        )


@pytest.fixture(scope="session")
def seaweed_s3(tmp_path_factory) -> S3Server:
    """One SeaweedFS (``weed mini``) for the session, in a temp folder; stopped at the end.

    Use a fresh key prefix (or bucket) per test: the server is shared by the whole session.
    """
    from infra import stack

    state_dir = tmp_path_factory.mktemp("seaweed")
    stack.up(state_dir, services=("s3",), timeout_s=60)
    try:
        env = stack.env(state_dir, show_secrets=True)
        yield S3Server(
            endpoint=env["AWS_ENDPOINT_URL_S3"],
            access_key=env["AWS_ACCESS_KEY_ID"],
            secret_key=env["AWS_SECRET_ACCESS_KEY"],
            bucket=stack.BUCKET,
            region=env["AWS_DEFAULT_REGION"],
            state_dir=state_dir,
        )
    finally:
        stack.down(state_dir)
