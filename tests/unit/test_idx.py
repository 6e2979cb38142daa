"""IDX parsing, validation and data versions, on the real 2k FashionMNIST sample and files made from it."""

from __future__ import annotations

import gzip
import shutil
from pathlib import Path

import numpy as np
import pyarrow.fs as pafs
import pytest

from tests.conftest import FASHION_SAMPLE
from tuning_core.config import FashionData
from tuning_core.data import idx
from tuning_core.errors import DataError

RAW = FASHION_SAMPLE / "FashionMNIST" / "raw"
NAMES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")
LOCAL = pafs.LocalFileSystem()


def _cfg(source: Path | str, **kw) -> FashionData:
    return FashionData(source=str(source), **kw)


def _prepare(source: Path, root: Path, **kw):
    return idx.prepare(_cfg(source, **kw), LOCAL, str(source), LOCAL, str(root))


def _copy_sample(dest: Path, gz: bool = True) -> Path:
    """The sample's four files in a plain folder, gzipped as shipped or decompressed."""
    dest.mkdir(parents=True, exist_ok=True)
    for name in NAMES:
        if gz:
            shutil.copy(RAW / f"{name}.gz", dest / f"{name}.gz")
        else:
            (dest / name).write_bytes(gzip.decompress((RAW / f"{name}.gz").read_bytes()))
    return dest


def _idx_bytes(arr: np.ndarray) -> bytes:
    header = bytes([0, 0, 0x08, arr.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in arr.shape)
    return header + arr.astype(np.uint8).tobytes()


def _write_set(dest: Path, train_images: np.ndarray, train_labels: np.ndarray, test_images: np.ndarray,
               test_labels: np.ndarray) -> Path:
    dest.mkdir(parents=True, exist_ok=True)
    for name, arr in zip(NAMES, (train_images, train_labels, test_images, test_labels), strict=True):
        (dest / name).write_bytes(_idx_bytes(arr))
    return dest


def _nothing_written(root: Path) -> bool:
    return not (root / "data").exists()


# --------------------------------------------------------------------------- the real sample


def test_real_sample_parses_into_1600_train_and_400_test_images():
    images = idx.read_idx(LOCAL, str(RAW / "train-images-idx3-ubyte.gz"))
    labels = idx.read_idx(LOCAL, str(RAW / "train-labels-idx1-ubyte.gz"))
    assert images.shape == (1600, 28, 28) and images.dtype == np.uint8
    assert labels.shape == (1600,)
    assert idx.read_idx(LOCAL, str(RAW / "t10k-images-idx3-ubyte.gz")).shape == (400, 28, 28)
    counts = np.bincount(labels, minlength=10)
    assert counts.min() >= 147 and counts.max() <= 184  # balanced, as the sample's README says


def test_prepare_writes_a_stratified_normalised_version_from_torchvision_layout(tmp_path):
    version = _prepare(FASHION_SAMPLE, tmp_path)
    assert version.dataset == "fashion-mnist" and version.schema_name == "idx"
    assert version.path == f"{tmp_path}/data/fashion-mnist/{version.version}"
    assert sorted(p.name for p in Path(version.path).iterdir()) == ["manifest.json", "test.npz", "train.npz",
                                                                     "valid.npz"]
    assert version.rows["train"] + version.rows["valid"] == 1600 and version.rows["test"] == 400
    assert version.rows["valid"] == pytest.approx(0.15 * 1600, abs=10)
    m = version.manifest
    assert m["image_shape"] == [28, 28] and m["source_folder"].endswith("FashionMNIST/raw")
    # Every class is represented in valid in about the same proportion as in train (stratified).
    train_share = np.array(m["class_counts"]["train"]) / version.rows["train"]
    valid_share = np.array(m["class_counts"]["valid"]) / version.rows["valid"]
    assert np.abs(train_share - valid_share).max() < 0.02

    x, y = idx.load_split(LOCAL, version.path, "train")
    assert x.shape == (version.rows["train"], 1, 28, 28) and x.dtype == np.float32 and y.dtype == np.int64
    assert abs(float(x.mean())) < 1e-3 and abs(float(x.std()) - 1) < 1e-3  # normalised with train statistics
    xt, yt = idx.load_split(LOCAL, version.path, "test")
    np.testing.assert_array_equal(yt, idx.read_idx(LOCAL, str(RAW / "t10k-labels-idx1-ubyte.gz")))
    raw_test = idx.read_idx(LOCAL, str(RAW / "t10k-images-idx3-ubyte.gz"))
    norm = m["normalisation"]
    np.testing.assert_allclose(xt[:, 0], (raw_test / 255.0 - norm["mean"]) / norm["std"], atol=1e-5)


def test_same_input_gives_the_same_version_without_rewriting(tmp_path):
    first = _prepare(FASHION_SAMPLE, tmp_path)
    manifest = Path(first.path) / "manifest.json"
    stamp = manifest.stat().st_mtime_ns
    second = _prepare(FASHION_SAMPLE, tmp_path)
    assert second.version == first.version and second.manifest == first.manifest
    assert manifest.stat().st_mtime_ns == stamp


def test_gz_and_raw_files_in_a_plain_folder_give_the_same_version(tmp_path):
    # Separate stores, so each call really reads and writes (a shared one would reuse the first version).
    gz = _prepare(_copy_sample(tmp_path / "gz", gz=True), tmp_path / "store-gz")
    raw = _prepare(_copy_sample(tmp_path / "raw", gz=False), tmp_path / "store-raw")
    layout = _prepare(FASHION_SAMPLE, tmp_path / "store-layout")
    assert gz.version == raw.version == layout.version
    for split in ("train", "valid", "test"):
        np.testing.assert_array_equal(idx.load_split(LOCAL, gz.path, split)[0],
                                      idx.load_split(LOCAL, raw.path, split)[0])
    assert raw.manifest["source_files"]["train_images"] == "train-images-idx3-ubyte"


def test_split_settings_change_the_version(tmp_path):
    base = _prepare(FASHION_SAMPLE, tmp_path)
    other_seed = _prepare(FASHION_SAMPLE, tmp_path, seed=1)
    capped = _prepare(FASHION_SAMPLE, tmp_path, max_train=500)
    assert len({base.version, other_seed.version, capped.version}) == 3
    assert capped.rows["train"] + capped.rows["valid"] == 500 and capped.manifest["dropped"]["max_train"] == 1100


def test_mnist_layout_is_found(tmp_path):
    _copy_sample(tmp_path / "src" / "MNIST" / "raw")
    version = _prepare(tmp_path / "src", tmp_path / "store")
    assert version.manifest["source_folder"].endswith("MNIST/raw") and version.rows["test"] == 400


def test_s3_source_reads_like_a_folder(s3_settings, tmp_path):
    from infra.storage import filesystem_for

    uri = f"{s3_settings.storage}/fashion-src"
    fs, path = filesystem_for(uri, s3_settings)
    for name in NAMES:
        # compression=None: pyarrow would gzip a ".gz" name a second time on the way in.
        with fs.open_output_stream(f"{path}/FashionMNIST/raw/{name}.gz", compression=None) as out:
            out.write((RAW / f"{name}.gz").read_bytes())
    from_s3 = idx.prepare(_cfg(uri), fs, path, LOCAL, str(tmp_path / "store"))
    local = _prepare(FASHION_SAMPLE, tmp_path / "store")
    assert from_s3.version == local.version and from_s3.rows == local.rows
    # ...and the version itself can live on S3 too.
    root_fs, root = filesystem_for(s3_settings.storage, s3_settings)
    on_s3 = idx.prepare(_cfg(uri), fs, path, root_fs, root)
    assert on_s3.uri.startswith("s3://") and on_s3.version == local.version
    x, y = idx.load_split(root_fs, on_s3.path, "valid")
    assert x.shape == (local.rows["valid"], 1, 28, 28) and len(y) == local.rows["valid"]


def test_parser_handles_full_size_official_files(tmp_path):
    # The official training file holds 60,000 28x28 images (47 MB): same header, same parser.
    images = np.zeros((60_000, 28, 28), dtype=np.uint8)
    images[-1, -1, -1] = 255
    (tmp_path / "big").write_bytes(_idx_bytes(images))
    parsed = idx.read_idx(LOCAL, str(tmp_path / "big"))
    assert parsed.shape == (60_000, 28, 28) and parsed[-1, -1, -1] == 255


def test_non_square_images_are_accepted_and_recorded(tmp_path):
    rng = np.random.default_rng(0)
    src = _write_set(tmp_path / "src", rng.integers(0, 256, (40, 20, 24)), np.arange(40) % 10,
                     rng.integers(0, 256, (10, 20, 24)), np.arange(10) % 10)
    version = _prepare(src, tmp_path / "store")
    assert version.manifest["image_shape"] == [20, 24]
    assert idx.load_split(LOCAL, version.path, "test")[0].shape == (10, 1, 20, 24)


# --------------------------------------------------------------------------- bad input


def test_missing_files_error_lists_the_expected_files_and_places(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError) as err:
        _prepare(tmp_path / "empty", tmp_path / "store")
    msg = str(err.value)
    for name in NAMES:
        assert name in msg
    assert "FashionMNIST/raw" in msg and "MNIST/raw" in msg and "\n" not in msg
    assert _nothing_written(tmp_path / "store")


def test_one_missing_file_is_named(tmp_path):
    src = _copy_sample(tmp_path / "src")
    (src / "t10k-labels-idx1-ubyte.gz").unlink()
    with pytest.raises(DataError, match=r"missing t10k-labels-idx1-ubyte\[\.gz\]"):
        _prepare(src, tmp_path / "store")
    assert _nothing_written(tmp_path / "store")


def test_bad_magic_number_is_reported_with_the_file(tmp_path):
    src = _copy_sample(tmp_path / "src", gz=False)
    data = bytearray((src / "train-labels-idx1-ubyte").read_bytes())
    data[2:4] = bytes([0x08, 0x03])  # an images header where labels belong
    (src / "train-labels-idx1-ubyte").write_bytes(bytes(data))
    with pytest.raises(DataError, match=r"train-labels-idx1-ubyte: bad magic number 2051, expected 2049"):
        _prepare(src, tmp_path / "store")
    assert _nothing_written(tmp_path / "store")


def test_not_an_idx_file_is_reported(tmp_path):
    (tmp_path / "notes.txt").write_bytes(b"hello, not an IDX file")
    with pytest.raises(DataError, match=r"notes.txt: bad magic number"):
        idx.read_idx(LOCAL, str(tmp_path / "notes.txt"))


def test_truncated_raw_file_is_reported(tmp_path):
    src = _copy_sample(tmp_path / "src", gz=False)
    path = src / "t10k-images-idx3-ubyte"
    path.write_bytes(path.read_bytes()[:-1000])
    with pytest.raises(DataError, match=r"t10k-images-idx3-ubyte: truncated: header says shape \[400, 28, 28\]"):
        _prepare(src, tmp_path / "store")
    assert _nothing_written(tmp_path / "store")


def test_truncated_gzip_is_reported_in_one_line(tmp_path):
    src = _copy_sample(tmp_path / "src")
    path = src / "train-images-idx3-ubyte.gz"
    path.write_bytes(path.read_bytes()[: 100_000])
    with pytest.raises(DataError, match=r"train-images-idx3-ubyte.gz: truncated gzip stream") as err:
        _prepare(src, tmp_path / "store")
    assert "\n" not in str(err.value)
    assert _nothing_written(tmp_path / "store")


def test_corrupt_gzip_is_reported_in_one_line(tmp_path):
    src = _copy_sample(tmp_path / "src")
    path = src / "train-images-idx3-ubyte.gz"
    data = bytearray(path.read_bytes())
    for i in range(2000, 2064):
        data[i] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(DataError, match=r"train-images-idx3-ubyte.gz: corrupt gzip data") as err:
        _prepare(src, tmp_path / "store")
    assert "\n" not in str(err.value)
    assert _nothing_written(tmp_path / "store")


def test_labels_out_of_range_are_rejected(tmp_path):
    rng = np.random.default_rng(0)
    labels = np.arange(40) % 10
    labels[17] = 12
    src = _write_set(tmp_path / "src", rng.integers(0, 256, (40, 28, 28)), labels,
                     rng.integers(0, 256, (10, 28, 28)), np.arange(10) % 10)
    with pytest.raises(DataError, match=r"train-labels-idx1-ubyte: label 12 at index 17, expected labels 0..9"):
        _prepare(src, tmp_path / "store")
    assert _nothing_written(tmp_path / "store")


def test_image_and_label_count_mismatch_is_rejected(tmp_path):
    rng = np.random.default_rng(0)
    src = _write_set(tmp_path / "src", rng.integers(0, 256, (40, 28, 28)), np.arange(40) % 10,
                     rng.integers(0, 256, (10, 28, 28)), np.arange(9) % 10)
    with pytest.raises(DataError, match=r"10 images but 9 labels, expected equal counts"):
        _prepare(src, tmp_path / "store")
    assert _nothing_written(tmp_path / "store")


def test_train_and_test_image_sizes_must_agree(tmp_path):
    rng = np.random.default_rng(0)
    src = _write_set(tmp_path / "src", rng.integers(0, 256, (40, 28, 28)), np.arange(40) % 10,
                     rng.integers(0, 256, (10, 32, 32)), np.arange(10) % 10)
    with pytest.raises(DataError, match=r"train images are \[28, 28\] but test images are \[32, 32\]"):
        _prepare(src, tmp_path / "store")


def test_load_split_rejects_unknown_split_and_incomplete_versions(tmp_path):
    version = _prepare(FASHION_SAMPLE, tmp_path)
    with pytest.raises(DataError, match=r"split 'holdout': expected one of \['train', 'valid', 'test'\]"):
        idx.load_split(LOCAL, version.path, "holdout")
    (Path(version.path) / "manifest.json").unlink()
    with pytest.raises(DataError, match="not a complete data version"):
        idx.load_split(LOCAL, version.path, "train")
