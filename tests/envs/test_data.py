"""Data pipeline: offline datasets, seeded disjoint splits, batch augmentation on the device."""

import pytest
import torch

from keepgym.envs.data import DATASETS, BatchLoader, DatasetNotFoundError, augment_batch, load_dataset


def test_digits_shapes_and_dtype():
    d = load_dataset("digits")
    assert d.train_x.dtype == torch.uint8 and d.train_x.shape[1:] == (1, 32, 32)
    assert d.num_classes == 10 and d.in_chans == 1
    assert len(d.train_y) + len(d.val_y) + len(d.test_y) == 1797
    assert set(d.train_y.unique().tolist()) == set(range(10))


def _rows(x):
    return {bytes(r.numpy().tobytes()) for r in x.flatten(1)}


@pytest.mark.parametrize("name", ["digits", "synthetic"])
def test_splits_disjoint_and_seeded(name):
    a = load_dataset(name, seed=3, train_size=600 if name == "synthetic" else None)
    b = load_dataset(name, seed=3, train_size=600 if name == "synthetic" else None)
    c = load_dataset(name, seed=4, train_size=600 if name == "synthetic" else None)
    assert torch.equal(a.val_x, b.val_x) and torch.equal(a.train_y, b.train_y)
    assert not torch.equal(a.val_x, c.val_x)
    # the validation split is held out from train: no image is in both
    assert not (_rows(a.train_x) & _rows(a.val_x))
    if name == "digits":  # the test split is fixed and disjoint from train/val
        assert torch.equal(a.test_x, c.test_x)
        assert not (_rows(a.test_x) & (_rows(a.train_x) | _rows(a.val_x)))


def test_synthetic_any_size():
    d = load_dataset("synthetic", image_size=16, in_chans=1, num_classes=7, train_size=100, test_size=20)
    assert d.train_x.shape[1:] == (1, 16, 16) and d.num_classes == 7 and len(d.test_y) == 20
    assert int(d.train_y.max()) < 7


def test_bad_names_and_sizes():
    with pytest.raises(ValueError, match="valid datasets"):
        load_dataset("imagenet1k")
    with pytest.raises(ValueError, match="val_size"):
        load_dataset("digits", val_size=0.0)


def test_missing_real_dataset_is_a_clear_error(tmp_path):
    with pytest.raises(DatasetNotFoundError, match="--download"):
        load_dataset("cifar10", tmp_path)
    assert "cifar10" in DATASETS


def test_loader_batches_normalised_and_augmented():
    d = load_dataset("synthetic", train_size=300)
    g = torch.Generator().manual_seed(0)
    loader = BatchLoader(d.train_x, d.train_y, d, 64, augment=True, drop_last=True, generator=g)
    batches = list(loader)
    assert len(batches) == len(loader) == len(d.train_y) // 64
    xb, yb = batches[0]
    assert xb.dtype == torch.float32 and xb.shape == (64, 3, 32, 32) and yb.shape == (64,)
    assert abs(float(xb.mean())) < 2.0
    # same generator seed -> same batches
    again = list(
        BatchLoader(
            d.train_x, d.train_y, d, 64, augment=True, drop_last=True, generator=torch.Generator().manual_seed(0)
        )
    )
    assert torch.equal(again[0][0], xb)


def test_augment_is_crop_and_flip():
    x = torch.arange(2 * 1 * 8 * 8, dtype=torch.float32).view(2, 1, 8, 8)
    out = augment_batch(x, torch.Generator().manual_seed(1), pad=0)
    # with no padding the crop is the identity, so each image is itself or its mirror
    for i in range(2):
        assert torch.equal(out[i], x[i]) or torch.equal(out[i], x[i].flip(-1))
    out = augment_batch(x, torch.Generator().manual_seed(1), pad=2)
    assert out.shape == x.shape


# --------------------------------------------------------------------------- the "folder" dataset
def _write_image_folder(root, sizes=((40, 30), (32, 32), (50, 64)), classes=("cat", "dog", "emu"), per_class=4):
    """A tiny ImageFolder tree of coloured PNG/JPEG images of mixed sizes; returns the files written."""
    from PIL import Image

    files = []
    for split, n in (("train", per_class), ("test", 2)):
        for c, name in enumerate(classes):
            folder = root / split / name
            folder.mkdir(parents=True)
            for i in range(n):
                w, h = sizes[(c + i) % len(sizes)]
                colour = (60 * c + 20, 10 * i, 200 - 50 * c)
                ext = "png" if i % 2 else "jpg"
                path = folder / f"{i}.{ext}"
                Image.new("RGB", (w, h), colour).save(path)
                files.append(path)
    return files


def test_folder_dataset_sizes_classes_cache_and_broken_files(tmp_path, caplog):
    root, cache = tmp_path / "imgs", tmp_path / "cache"
    _write_image_folder(root)
    (root / "train" / "dog" / "broken.jpg").write_bytes(b"not an image")  # skipped and counted
    (root / "train" / "dog" / "notes.txt").write_text("ignored: not an image file ending")
    d = load_dataset("folder", root, image_size=16, val_size=2, cache_dir=cache)
    assert d.classes == ("cat", "dog", "emu") and d.num_classes == 3
    assert d.train_x.dtype == torch.uint8 and d.train_x.shape[1:] == (3, 16, 16)
    assert len(d.train_y) + len(d.val_y) == 12 and len(d.test_y) == 6
    assert d.skipped_files == 1
    assert "skipped 1 unreadable" in caplog.text
    # per-channel statistics come from the training split
    x = d.train_x.double() / 255
    assert d.mean == pytest.approx(x.mean(dim=(0, 2, 3)).tolist(), abs=1e-6)
    assert d.std == pytest.approx(x.permute(1, 0, 2, 3).reshape(3, -1).std(dim=1, unbiased=False).tolist(), abs=1e-6)
    cached = list((cache / "folders").glob("*.npz"))
    assert len(cached) == 1
    # second load: the cache file is read (same tensors), nothing is decoded again
    caplog.clear()
    import logging

    with caplog.at_level(logging.INFO, logger="keepgym.envs.data"):
        again = load_dataset("folder", root, image_size=16, val_size=2, cache_dir=cache)
    assert "read from the cache" in caplog.text
    assert torch.equal(again.train_x, d.train_x) and torch.equal(again.test_y, d.test_y)
    assert again.skipped_files == 1
    # another size or changed content is another key
    load_dataset("folder", root, image_size=8, val_size=2, cache_dir=cache)
    assert len(list((cache / "folders").glob("*.npz"))) == 2
    from PIL import Image

    Image.new("RGB", (20, 20), (1, 2, 3)).save(root / "train" / "cat" / "0.jpg")
    load_dataset("folder", root, image_size=16, val_size=2, cache_dir=cache)
    assert len(list((cache / "folders").glob("*.npz"))) == 3


def test_folder_dataset_from_an_archive_and_val_split(tmp_path):
    import tarfile

    root, cache = tmp_path / "tree" / "mydata", tmp_path / "cache"
    _write_image_folder(root, sizes=((24, 24),), classes=("a", "b"))
    (root / "test").rename(root / "val")  # val/ is accepted in place of test/
    archive = tmp_path / "mydata.tar.gz"
    with tarfile.open(archive, "w:gz") as tf:
        tf.add(root, arcname="mydata")
    d = load_dataset("folder", archive, val_size=0.25, cache_dir=cache)
    assert d.image_size == 24 and d.classes == ("a", "b") and len(d.test_y) == 4
    assert len(list((cache / "extracted").iterdir())) == 1


def test_folder_dataset_one_line_errors(tmp_path):
    with pytest.raises(ValueError, match="needs its folder"):
        load_dataset("folder")
    with pytest.raises(DatasetNotFoundError, match="does not exist"):
        load_dataset("folder", tmp_path / "nowhere", cache_dir=tmp_path)
    root = tmp_path / "imgs"
    _write_image_folder(root, classes=("a", "b"))
    import shutil

    shutil.rmtree(root / "test")
    with pytest.raises(DatasetNotFoundError, match="no test/ or val/ split"):
        load_dataset("folder", root, cache_dir=tmp_path)
    (root / "test" / "a").mkdir(parents=True)
    (root / "train" / "empty").mkdir()
    with pytest.raises(ValueError, match="empty has no images") as info:
        load_dataset("folder", root, cache_dir=tmp_path)
    assert "\n" not in str(info.value)  # one line, for the CLI's one-line error
    (root / "train" / "empty").rmdir()
    (root / "test" / "extra").mkdir()
    with pytest.raises(ValueError, match="classes the train split lacks: extra"):
        load_dataset("folder", root, cache_dir=tmp_path)


_CIFAR10_TARBALL = __import__("pathlib").Path(__file__).resolve().parents[3] / "shared" / "data" / "cifar10-jpeg.tar.gz"


@pytest.mark.slow
@pytest.mark.skipif(not _CIFAR10_TARBALL.is_file(), reason=f"no shared CIFAR-10 tarball at {_CIFAR10_TARBALL}")
def test_real_cifar10_from_the_shared_tarball():
    # extracted and cached outside the repository (never into it), where `keepgym frontier` finds it too
    cache = __import__("pathlib").Path.home() / ".cache" / "keepgym"
    d = load_dataset("folder", _CIFAR10_TARBALL, val_size=5000, cache_dir=cache)
    assert len(d.train_y) + len(d.val_y) == 50_000 and len(d.test_y) == 10_000
    assert d.num_classes == 10 and d.train_x.shape[1:] == (3, 32, 32)
    assert d.classes[0] == "airplane" and d.skipped_files == 0
    assert torch.bincount(d.test_y).tolist() == [1000] * 10
    assert d.mean == pytest.approx((0.491, 0.482, 0.447), abs=0.01)  # CIFAR-10's published statistics
