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
