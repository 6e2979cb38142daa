"""Environment settings, read with pydantic-settings under their standard names.

Nothing happens at import: call ``get_settings()`` (cached) where the settings are needed.
"""

from __future__ import annotations

from functools import lru_cache

from pydantic import AliasChoices, Field, SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict


class Settings(BaseSettings):
    model_config = SettingsConfigDict(extra="ignore", populate_by_name=True)

    storage: str = Field("./.tunepipe", validation_alias=AliasChoices("TUNEPIPE_STORAGE", "storage"))
    mlflow_tracking_uri: str | None = Field(
        None, validation_alias=AliasChoices("MLFLOW_TRACKING_URI", "mlflow_tracking_uri")
    )
    s3_endpoint_url: str | None = Field(
        None, validation_alias=AliasChoices("AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL", "s3_endpoint_url")
    )
    aws_access_key_id: SecretStr | None = Field(
        None, validation_alias=AliasChoices("AWS_ACCESS_KEY_ID", "aws_access_key_id")
    )
    aws_secret_access_key: SecretStr | None = Field(
        None, validation_alias=AliasChoices("AWS_SECRET_ACCESS_KEY", "aws_secret_access_key")
    )
    aws_region: str = Field(
        "us-east-1", validation_alias=AliasChoices("AWS_DEFAULT_REGION", "AWS_REGION", "aws_region")
    )
    ray_address: str | None = Field(None, validation_alias=AliasChoices("RAY_ADDRESS", "ray_address"))
    ray_num_cpus: int | None = Field(None, validation_alias=AliasChoices("TUNEPIPE_RAY_NUM_CPUS", "ray_num_cpus"))
    prefect_api_url: str | None = Field(None, validation_alias=AliasChoices("PREFECT_API_URL", "prefect_api_url"))
    # The experiment lease (infra.lease): how long a run waits for a held one (0: stop at once, exit 3),
    # and how long a record stays valid without its holder's heartbeat (renewed every third of it).
    lease_wait_s: float = Field(0.0, ge=0, validation_alias=AliasChoices("TUNEPIPE_LEASE_WAIT_S", "lease_wait_s"))
    lease_ttl_s: float = Field(60.0, gt=0, validation_alias=AliasChoices("TUNEPIPE_LEASE_TTL_S", "lease_ttl_s"))
    # The base of every stage's retry delays (tasks.stages.with_retry_policy): quick checks wait half of
    # it, stages that write to S3, MLflow or Ray back off 1, 2, 4 times it (with jitter). Read when a
    # flow runs, so that a test runs the shipped policy with short delays.
    retry_delay_s: float = Field(10.0, ge=0, validation_alias=AliasChoices("TUNEPIPE_RETRY_DELAY_S",
                                                                           "retry_delay_s"))

    @property
    def is_s3(self) -> bool:
        return self.storage.startswith("s3://")


@lru_cache
def get_settings() -> Settings:
    return Settings()
