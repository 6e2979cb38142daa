"""The storage root's id marker: what Prefect cache keys are bound to (tasks.stages)."""

from __future__ import annotations

import pytest

from tests.conftest import free_port
from tuning_core.errors import ServiceUnavailable, StorageError


def _storage(settings):
    from infra.storage import build_storage

    return build_storage(settings)


def _unchecked(settings):
    """The storage root as a stage holds it once built: the store may fail afterwards (a blip,
    rotated keys), which build_storage's own bucket check cannot see."""
    from infra.storage import Storage, filesystem_for

    fs, path = filesystem_for(settings.storage, settings)
    return Storage(fs=fs, root=path, uri=f"s3://{path}")


def test_local_root_gets_one_id_that_survives_and_a_wiped_root_gets_another(local_settings):
    import shutil

    storage = _storage(local_settings)
    first = storage.instance_id()
    assert len(first) == 32 and storage.instance_id() == first == _storage(local_settings).instance_id()
    shutil.rmtree(storage.root)
    assert storage.instance_id() != first


def test_s3_root_id_is_stable_and_refused_credentials_fail_without_a_new_id(s3_settings, moto_auth_switch):
    from pydantic import SecretStr

    storage = _storage(s3_settings)
    first = storage.instance_id()
    assert _storage(s3_settings).instance_id() == first

    moto_auth_switch(True)  # the keys below are unknown to moto: every request is refused
    wrong = s3_settings.model_copy(update={"aws_secret_access_key": SecretStr("wrong-secret")})
    with pytest.raises(StorageError, match=r"storage root s3://tp-\w+/root: id marker cannot be read or written") \
            as err:
        _unchecked(wrong).instance_id()
    assert "wrong-secret" not in str(err.value) and "\n" not in str(err.value)
    moto_auth_switch(False)
    assert storage.instance_id() == first  # nothing was overwritten meanwhile


def test_unreachable_s3_endpoint_is_a_retryable_error_not_a_new_id(s3_settings):
    unreachable = s3_settings.model_copy(update={"s3_endpoint_url": f"http://127.0.0.1:{free_port()}"})
    with pytest.raises(ServiceUnavailable, match="id marker cannot be read or written"):
        _unchecked(unreachable).instance_id()


def test_predictions_reach_s3_whole_or_not_at_all(s3_settings, tmp_path):
    """Batch scoring's last step: the finished local file is copied beside its target, then moved; a
    copy that fails leaves neither the target nor the temporary object, and says where in one line."""
    import pyarrow.fs as pafs

    from tasks.scoring import _publish
    from tasks.workloads import Context

    ctx = Context.build(s3_settings)
    local = tmp_path / "p.parquet"
    local.write_bytes(b"PAR1" + b"x" * 100_000)
    target = ctx.storage.path("predictions", "m-v1", "abc.parquet")
    _publish(local, ctx, target)
    folder = ctx.storage.path("predictions", "m-v1")
    listed = ctx.storage.fs.get_file_info(pafs.FileSelector(folder))
    assert [(i.base_name, i.size) for i in listed] == [("abc.parquet", 100_004)]

    unreachable = s3_settings.model_copy(update={"s3_endpoint_url": f"http://127.0.0.1:{free_port()}"})
    gone = Context(settings=unreachable, storage=_unchecked(unreachable))
    with pytest.raises(ServiceUnavailable, match=r"s3://.*/predictions/m-v1/def\.parquet: cannot write the predictions"):
        _publish(local, gone, gone.storage.path("predictions", "m-v1", "def.parquet"))
    assert [i.base_name for i in ctx.storage.fs.get_file_info(pafs.FileSelector(folder))] == ["abc.parquet"]
