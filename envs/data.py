"""Datasets held in memory as uint8 tensors, with seeded splits and on-device batch augmentation.

Real datasets (CIFAR-10/100, FashionMNIST, Imagenette) come through torchvision and are only
downloaded when the caller asks for it (``download=True``). Two datasets need nothing from the
network and are what the tests and the offline demo use:

* ``digits``: scikit-learn's bundled 8x8 handwritten digits (1,797 real images, 10 classes),
  upsampled to 32x32 grey images;
* ``synthetic``: seeded procedural images (one coloured shape per image on a cluttered background,
  the class decides shape and position), any size, channel count and number of classes.

Any image folder in torchvision's ``ImageFolder`` layout is the ``folder`` dataset
(``load_dataset("folder", DIR)``): ``DIR/train/<class>/*`` plus ``DIR/test/<class>/*`` (or ``val/``),
any image size and format Pillow reads, resized (shorter side) and centre-cropped to ``image_size``,
decoded once into the same uint8 tensors and cached on disk under a key of the files' content, so the
second load only reads and hashes the files. ``DIR`` may also be a ``.tar``/``.tar.gz``/``.tgz``/``.zip``
archive of such a tree, extracted once into the cache. Its per-channel mean/std are computed from the
training split.

Every dataset is returned as a :class:`DatasetSplits` with a validation split held out from the
training data (seeded), so rewards and model selection never look at the test split.
Augmentation (pad-and-crop, horizontal flip) and normalisation are applied to whole batches on the
device by :class:`BatchLoader`, so a 2-core machine is not bottlenecked by a per-image PIL pipeline.
"""

from __future__ import annotations

import hashlib
import io
import logging
import math
import os
import shutil
import tarfile
import zipfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

__all__ = [
    "DATASETS",
    "DatasetSplits",
    "BatchLoader",
    "DatasetNotFoundError",
    "load_dataset",
    "default_data_root",
]

logger = logging.getLogger(__name__)

DATASETS = ("digits", "synthetic", "cifar10", "cifar100", "fashion_mnist", "imagenette", "folder")

#: File endings an image folder's images may have (torchvision's ``IMG_EXTENSIONS``).
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")
_ARCHIVE_ENDINGS = (".tar.gz", ".tgz", ".tar", ".zip")
_FOLDER_CACHE_VERSION = "1"

_STATS = {
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    "cifar100": ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
    "fashion_mnist": ((0.2860,), (0.3530,)),
    "imagenette": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
}


class DatasetNotFoundError(FileNotFoundError):
    """A real dataset is not on disk and downloading was not requested."""


@dataclass
class DatasetSplits:
    """Train / validation / test tensors of one dataset, images as uint8 ``(N, C, H, W)``.

    The validation split is held out from the training data. ``mean``/``std`` are per channel in
    [0, 1] units and are applied by :meth:`normalize`.
    """

    name: str
    num_classes: int
    in_chans: int
    image_size: int
    train_x: torch.Tensor
    train_y: torch.Tensor
    val_x: torch.Tensor
    val_y: torch.Tensor
    test_x: torch.Tensor
    test_y: torch.Tensor
    mean: tuple[float, ...]
    std: tuple[float, ...]
    #: class names (``folder``: the train split's sub-folder names, in label order); empty if unnamed
    classes: tuple[str, ...] = ()
    #: unreadable files skipped while decoding (``folder`` only)
    skipped_files: int = 0

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        """Turn a uint8 batch into a normalised float32 batch on the same device."""
        return normalize(x, self.mean, self.std)

    def split(self, name: str) -> tuple[torch.Tensor, torch.Tensor]:
        """Return ``(x, y)`` of ``"train"``, ``"val"`` or ``"test"``."""
        if name not in ("train", "val", "test"):
            raise ValueError(f"unknown split {name!r}; valid splits: train, val, test")
        return getattr(self, f"{name}_x"), getattr(self, f"{name}_y")

    def __repr__(self) -> str:
        return (
            f"DatasetSplits({self.name!r}, classes={self.num_classes}, shape={self.in_chans}x"
            f"{self.image_size}x{self.image_size}, train={len(self.train_y)}, val={len(self.val_y)}, "
            f"test={len(self.test_y)})"
        )


def normalize(x: torch.Tensor, mean: tuple[float, ...], std: tuple[float, ...]) -> torch.Tensor:
    """uint8 ``(N, C, H, W)`` -> float32, ``(x / 255 - mean) / std`` per channel."""
    m = torch.tensor(mean, dtype=torch.float32, device=x.device).view(1, -1, 1, 1)
    s = torch.tensor(std, dtype=torch.float32, device=x.device).view(1, -1, 1, 1)
    return (x.float().div_(255.0) - m) / s


def default_data_root() -> Path:
    """``$KEEPGYM_DATA`` or ``~/.cache/keepgym/data``."""
    return Path(os.environ.get("KEEPGYM_DATA", Path.home() / ".cache" / "keepgym" / "data"))


def _resize(x: torch.Tensor, size: int) -> torch.Tensor:
    if x.shape[-1] == size and x.shape[-2] == size:
        return x
    y = F.interpolate(x.float(), size=(size, size), mode="bilinear", align_corners=False)
    return y.round_().clamp_(0, 255).to(torch.uint8)


def _digits() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    from sklearn.datasets import load_digits

    bunch = load_digits()
    x = torch.from_numpy(bunch.images.astype(np.float32) * (255.0 / 16.0)).round().to(torch.uint8)
    y = torch.from_numpy(bunch.target.astype(np.int64))
    # Fixed, seed-independent test split (20 %), so every run reports on the same images.
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(1234))
    n_test = len(y) // 5
    test, train = perm[:n_test], perm[n_test:]
    x = x.unsqueeze(1)
    return x[train], y[train], x[test], y[test]


def _synthetic(n: int, num_classes: int, size: int, chans: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Procedural images: a class-specific shape at a class-specific place in clutter.

    The class decides the object's shape (square, disc, cross, ring, bar) and its quadrant, so
    where the model looks matters: a patch selector that keeps the object's patches keeps the
    label, one that keeps background loses it.
    """
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, num_classes, (n,), generator=g)
    yy, xx = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
    img = torch.rand(n, chans, size, size, generator=g) * 0.35  # background noise
    # clutter: a few random faint blobs per image
    for _ in range(3):
        cy = torch.randint(0, size, (n, 1, 1), generator=g)
        cx = torch.randint(0, size, (n, 1, 1), generator=g)
        r = max(1, size // 10)
        blob = (((yy - cy) ** 2 + (xx - cx) ** 2) <= r * r).float().unsqueeze(1)
        img = img + 0.25 * blob * torch.rand(n, chans, 1, 1, generator=g)
    shape = y % 5
    quadrant = (y // 5) % 4
    half = size // 2
    oy = (quadrant // 2) * half + torch.randint(0, max(1, half // 4), (n,), generator=g)
    ox = (quadrant % 2) * half + torch.randint(0, max(1, half // 4), (n,), generator=g)
    s = max(2, int(size * 0.35))
    cy = (oy + s // 2).view(n, 1, 1)
    cx = (ox + s // 2).view(n, 1, 1)
    dy, dx = (yy - cy).abs(), (xx - cx).abs()
    rr = ((yy - cy) ** 2 + (xx - cx) ** 2).float()
    masks = torch.stack(
        [
            (dy <= s // 2) & (dx <= s // 2),
            rr <= (s / 2) ** 2,
            ((dy <= s // 6) & (dx <= s // 2)) | ((dx <= s // 6) & (dy <= s // 2)),
            (rr <= (s / 2) ** 2) & (rr >= (s / 3.5) ** 2),
            (dy <= s // 2) & (dx <= s // 6),
        ],
        dim=1,
    )  # n, 5, H, W
    mask = masks[torch.arange(n), shape].float().unsqueeze(1)
    colour = 0.6 + 0.4 * torch.rand(n, chans, 1, 1, generator=g)
    img = img * (1 - mask) + colour * mask
    # class-dependent tint when there are more classes than shapes x quadrants
    if num_classes > 20:
        tint = ((y // 20).float() / math.ceil(num_classes / 20)).view(n, 1, 1, 1)
        img = img * (0.7 + 0.3 * tint)
    return (img.clamp(0, 1) * 255).round().to(torch.uint8), y


def _torchvision(name: str, root: Path, download: bool) -> tuple[torch.Tensor, ...]:
    try:
        import torchvision
    except ImportError as err:  # pragma: no cover - torchvision is a dependency
        raise ImportError("torchvision is needed for real datasets: pip install torchvision") from err

    def arr(ds) -> tuple[torch.Tensor, torch.Tensor]:
        x = torch.as_tensor(np.asarray(ds.data))
        x = x.unsqueeze(1) if x.ndim == 3 else x.permute(0, 3, 1, 2)
        return x.contiguous().to(torch.uint8), torch.as_tensor(np.asarray(ds.targets), dtype=torch.int64)

    try:
        if name in ("cifar10", "cifar100"):
            cls = torchvision.datasets.CIFAR10 if name == "cifar10" else torchvision.datasets.CIFAR100
            tr, te = cls(str(root), train=True, download=download), cls(str(root), train=False, download=download)
            return (*arr(tr), *arr(te))
        if name == "fashion_mnist":
            cls = torchvision.datasets.FashionMNIST
            tr, te = cls(str(root), train=True, download=download), cls(str(root), train=False, download=download)
            return tr.data.unsqueeze(1), tr.targets.long(), te.data.unsqueeze(1), te.targets.long()
        if name == "imagenette":
            return _imagenette(root, download)
    except RuntimeError as err:
        if "not found" in str(err).lower() or "download" in str(err).lower():
            raise DatasetNotFoundError(
                f"dataset {name!r} was not found under {root}. Download it with "
                f"`keepgym train ... --dataset {name} --data-root {root} --download` "
                f"(needs internet), or point --data-root at a copy."
            ) from None
        raise
    raise ValueError(name)


def _imagenette(root: Path, download: bool, size: int = 160) -> tuple[torch.Tensor, ...]:
    import torchvision
    from torchvision.transforms import v2

    folder = root / "imagenette2-160"
    if not folder.exists():
        if download:
            torchvision.datasets.Imagenette(str(root), split="train", size="160px", download=True)
        else:
            raise DatasetNotFoundError(
                f"dataset 'imagenette' was not found at {folder}. Download it with --download "
                "(needs internet), or unpack imagenette2-160.tgz there."
            )
    tf = v2.Compose([v2.Resize(size), v2.CenterCrop(size), v2.PILToTensor()])
    out = []
    for split in ("train", "val"):
        ds = torchvision.datasets.ImageFolder(str(folder / split), transform=tf)
        xs = torch.stack([ds[i][0] for i in range(len(ds))])
        out += [xs, torch.as_tensor(ds.targets, dtype=torch.int64)]
    return tuple(out)


def _cache_root() -> Path:
    """``$KEEPGYM_CACHE`` or ``~/.cache/keepgym`` (decoded image folders, extracted archives)."""
    return Path(os.environ.get("KEEPGYM_CACHE", Path.home() / ".cache" / "keepgym"))


def _is_archive(path: Path) -> bool:
    return path.is_file() and path.name.lower().endswith(_ARCHIVE_ENDINGS)


def _file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _extract_archive(archive: Path, cache_dir: Path) -> Path:
    """Extract ``archive`` once into ``cache_dir/extracted/<sha256>``; return the folder holding ``train/``.

    Tar members are extracted with the ``data`` filter (no absolute paths, links out of the folder or
    device files); zip members that would land outside the folder are refused.
    """
    dest = cache_dir / "extracted" / _file_sha256(archive)[:16]
    if not (dest / ".complete").is_file():
        tmp = dest.with_name(dest.name + f".tmp{os.getpid()}")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        logger.info("extracting %s into %s (once)", archive, dest)
        try:
            if archive.name.lower().endswith(".zip"):
                with zipfile.ZipFile(archive) as zf:
                    for name in zf.namelist():
                        target = (tmp / name).resolve()
                        if not target.is_relative_to(tmp.resolve()):
                            raise ValueError(f"archive {archive}: member {name!r} points outside the folder")
                    zf.extractall(tmp)
            else:
                with tarfile.open(archive) as tf:
                    tf.extractall(tmp, filter="data")
        except (tarfile.TarError, zipfile.BadZipFile, OSError) as err:
            shutil.rmtree(tmp, ignore_errors=True)
            raise ValueError(f"archive {archive} could not be extracted: {err}") from None
        (tmp / ".complete").write_text(str(archive))
        shutil.rmtree(dest, ignore_errors=True)
        tmp.rename(dest)
    # the tree may sit at the top of the archive or in one folder inside it
    if (dest / "train").is_dir():
        return dest
    subdirs = [p for p in dest.iterdir() if p.is_dir()]
    if len(subdirs) == 1 and (subdirs[0] / "train").is_dir():
        return subdirs[0]
    return dest


def _list_split(split_dir: Path, classes: list[str] | None) -> tuple[list[str], list[tuple[Path, int]]]:
    """Classes (sorted sub-folder names) and ``(file, label)`` pairs of one split folder."""
    found = sorted(p.name for p in split_dir.iterdir() if p.is_dir() and not p.name.startswith("."))
    if classes is None:
        classes = found
        if not classes:
            raise ValueError(f"image folder {split_dir} has no class sub-folders (expected {split_dir}/<class>/*)")
    else:
        unknown = sorted(set(found) - set(classes))
        if unknown:
            raise ValueError(f"{split_dir} has classes the train split lacks: {', '.join(unknown[:5])}")
    items: list[tuple[Path, int]] = []
    for label, name in enumerate(classes):
        folder = split_dir / name
        files = (
            sorted(
                p
                for p in folder.rglob("*")
                if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS and not p.name.startswith(".")
            )
            if folder.is_dir()
            else []
        )
        if not files and split_dir.name == "train":
            raise ValueError(f"class folder {folder} has no images ({', '.join(IMAGE_EXTENSIONS)})")
        items += [(f, label) for f in files]
    return classes, items


def _decode(blob: bytes, size: int | None) -> np.ndarray:
    """Image bytes -> ``(size, size, 3)`` uint8: RGB, shorter side resized to ``size``, centre crop."""
    from PIL import Image

    with Image.open(io.BytesIO(blob)) as img:
        img = img.convert("RGB")
        if size is not None and img.size != (size, size):
            w, h = img.size
            scale = size / min(w, h)
            nw, nh = max(size, round(w * scale)), max(size, round(h * scale))
            img = img.resize((nw, nh), Image.BILINEAR)
            left, top = (nw - size) // 2, (nh - size) // 2
            img = img.crop((left, top, left + size, top + size))
        return np.asarray(img, dtype=np.uint8)


def _image_folder(
    root: Path, image_size: int | None, cache_dir: Path
) -> tuple[tuple[torch.Tensor, ...], list[str], int]:
    """Decode (or read from the cache) an ImageFolder tree's train and test/val splits.

    Returns:
        ``((train_x, train_y, test_x, test_y), class names, number of unreadable files skipped)``.
    """
    if not root.exists():
        raise DatasetNotFoundError(f"image folder {root} does not exist")
    if _is_archive(root):
        root = _extract_archive(root, cache_dir)
    if not root.is_dir():
        raise ValueError(f"{root} is neither an image folder nor a .tar/.tar.gz/.tgz/.zip archive of one")
    train_dir = root / "train"
    if not train_dir.is_dir():
        raise DatasetNotFoundError(f"image folder {root} has no train/ split (expected {root}/train/<class>/*)")
    test_dir = next((root / s for s in ("test", "val") if (root / s).is_dir()), None)
    if test_dir is None:
        raise DatasetNotFoundError(f"image folder {root} has no test/ or val/ split (expected {root}/test/<class>/*)")
    classes, train_items = _list_split(train_dir, None)
    _, test_items = _list_split(test_dir, classes)
    if not test_items:
        raise ValueError(f"{test_dir} holds no images")
    # The cache key covers every file's path, label and bytes, plus the decoding settings.
    key = hashlib.sha256(f"v{_FOLDER_CACHE_VERSION} size={image_size}\n".encode())
    blobs: list[list[bytes]] = [[], []]
    for s, items in enumerate((train_items, test_items)):
        base = (train_dir, test_dir)[s]
        for path, label in items:
            blob = path.read_bytes()
            key.update(f"{s} {label} {path.relative_to(base).as_posix()} {len(blob)}\n".encode())
            key.update(hashlib.sha256(blob).digest())
            blobs[s].append(blob)
    cache_file = cache_dir / "folders" / f"{key.hexdigest()[:32]}.npz"
    if cache_file.is_file():
        with np.load(cache_file, allow_pickle=False) as z:
            logger.info("image folder %s: decoded tensors read from the cache %s", root, cache_file)
            tensors = tuple(torch.from_numpy(z[k].copy()) for k in ("train_x", "train_y", "test_x", "test_y"))
            return tensors, z["classes"].tolist(), int(z["skipped"])

    size = image_size
    out: list[torch.Tensor] = []
    skipped: list[str] = []
    for s, items in enumerate((train_items, test_items)):
        images, labels = [], []
        for (path, label), blob in zip(items, blobs[s], strict=True):
            try:
                arr = _decode(blob, size)
            except Exception:  # noqa: BLE001 - Pillow raises many types for broken files; skip and count
                skipped.append(str(path))
                continue
            if size is None:  # the first readable image fixes the size when none was asked for
                size = min(arr.shape[:2])
                arr = _decode(blob, size)
            images.append(arr)
            labels.append(label)
        split_name = ("train", "test")[s]
        if not images:
            raise ValueError(f"image folder {root}: no readable image in the {split_name} split")
        present = set(labels)
        empty = [classes[c] for c in range(len(classes)) if c not in present]
        if split_name == "train" and empty:
            raise ValueError(f"image folder {root}: class {empty[0]!r} has no readable training image")
        out += [
            torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).contiguous(),
            torch.tensor(labels, dtype=torch.int64),
        ]
    if skipped:
        logger.warning(
            "image folder %s: skipped %d unreadable file(s), e.g. %s", root, len(skipped), ", ".join(skipped[:3])
        )
    cache_file.parent.mkdir(parents=True, exist_ok=True)
    tmp = cache_file.with_name(cache_file.stem + f".tmp{os.getpid()}.npz")
    np.savez(
        tmp,
        train_x=out[0].numpy(),
        train_y=out[1].numpy(),
        test_x=out[2].numpy(),
        test_y=out[3].numpy(),
        classes=np.array(classes, dtype=np.str_),
        skipped=np.array(len(skipped)),
    )
    os.replace(tmp, cache_file)
    logger.info("image folder %s: %d train / %d test images cached in %s", root, len(out[1]), len(out[3]), cache_file)
    return tuple(out), classes, len(skipped)


def _channel_stats(x: torch.Tensor, chunk: int = 4096) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and std of uint8 images ``(N, C, H, W)`` in [0, 1] units, in float64 chunks."""
    c = x.shape[1]
    total = torch.zeros(c, dtype=torch.float64)
    squares = torch.zeros(c, dtype=torch.float64)
    for start in range(0, len(x), chunk):
        part = x[start : start + chunk].to(torch.float64).div_(255.0)
        total += part.sum(dim=(0, 2, 3))
        squares += part.square().sum(dim=(0, 2, 3))
    n = len(x) * x.shape[2] * x.shape[3]
    mean = total / n
    std = (squares / n - mean.square()).clamp_min(1e-12).sqrt()
    return tuple(float(v) for v in mean), tuple(float(v) for v in std)


def _held_out(n: int, val_size: float | int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    n_val = int(round(val_size * n)) if isinstance(val_size, float) and val_size < 1 else int(val_size)
    if not 0 < n_val < n:
        raise ValueError(f"val_size={val_size!r} leaves no train or no validation images out of {n}")
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    return perm[n_val:], perm[:n_val]


def load_dataset(
    name: str,
    data_root: str | os.PathLike | None = None,
    *,
    val_size: float | int = 0.1,
    seed: int = 0,
    download: bool = False,
    image_size: int | None = None,
    train_size: int | None = None,
    test_size: int | None = None,
    num_classes: int | None = None,
    in_chans: int | None = None,
    cache_dir: str | os.PathLike | None = None,
) -> DatasetSplits:
    """Load a dataset into memory as uint8 tensors with seeded train / val / test splits.

    Args:
        name: one of :data:`DATASETS`.
        data_root: folder of the torchvision datasets (default :func:`default_data_root`); for
            ``folder``, the ImageFolder tree (``DIR/train/<class>/*``, ``DIR/test|val/<class>/*``) or a
            ``.tar``/``.tar.gz``/``.tgz``/``.zip`` archive of one.
        val_size: fraction (< 1) or count of training images held out for validation.
        seed: seeds the validation hold-out (and, for ``synthetic``, the images).
        download: let torchvision download a missing real dataset.
        image_size: resize to this square size (default: the dataset's own; digits -> 32; ``folder``:
            the shorter side of its first training image; other images are resized (shorter side) and
            centre-cropped to it).
        train_size: keep at most this many training images (before the validation hold-out).
        test_size: keep at most this many test images (a fixed random subset, the same for every seed).
        num_classes: ``synthetic`` only (default 10).
        in_chans: ``synthetic`` only (default 3).
        cache_dir: ``folder`` only: where decoded folders (``folders/<content key>.npz``) and extracted
            archives go (default ``$KEEPGYM_CACHE`` or ``~/.cache/keepgym``).

    Raises:
        ValueError: unknown name, bad sizes; ``folder``: an empty class, a class only in the test split,
            no readable image in a split. Unreadable files are skipped, counted (``skipped_files``) and
            logged, not fatal.
        DatasetNotFoundError: a real dataset is missing and ``download`` is False; ``folder``: the folder,
            its ``train/`` or its ``test/``/``val/`` split is missing.
    """
    key = name.lower().replace("-", "_")
    if key == "fashionmnist":
        key = "fashion_mnist"
    if key not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}; valid datasets: {', '.join(DATASETS)}")
    if image_size is not None and image_size < 4:
        raise ValueError(f"image_size must be >= 4, got {image_size}")
    root = Path(data_root).expanduser() if data_root is not None else default_data_root()
    class_names: tuple[str, ...] = ()
    skipped = 0
    if key == "folder":
        if data_root is None:
            raise ValueError("the folder dataset needs its folder: data_root=DIR (--data-root DIR)")
        if num_classes is not None or in_chans is not None:
            raise ValueError("num_classes and in_chans can only be set for the synthetic dataset")
        cache = Path(cache_dir).expanduser() if cache_dir is not None else _cache_root()
        (tr_x, tr_y, te_x, te_y), names, skipped = _image_folder(root, image_size, cache)
        class_names, classes = tuple(names), len(names)
        mean = std = None  # from the training split, below
    elif key == "digits":
        tr_x, tr_y, te_x, te_y = _digits()
        tr_x, te_x = _resize(tr_x, image_size or 32), _resize(te_x, image_size or 32)
        classes, mean, std = 10, (0.3,), (0.32,)
    elif key == "synthetic":
        classes = num_classes or 10
        size, chans = image_size or 32, in_chans or 3
        n_train, n_test = train_size or 2000, test_size or 500
        tr_x, tr_y = _synthetic(n_train, classes, size, chans, seed=10_000 + seed)
        te_x, te_y = _synthetic(n_test, classes, size, chans, seed=20_000 + seed)
        mean, std = (0.25,) * chans, (0.25,) * chans
    else:
        if num_classes is not None or in_chans is not None:
            raise ValueError("num_classes and in_chans can only be set for the synthetic dataset")
        tr_x, tr_y, te_x, te_y = _torchvision(key, root, download)
        if image_size is not None:
            tr_x, te_x = _resize(tr_x, image_size), _resize(te_x, image_size)
        classes = int(tr_y.max()) + 1
        mean, std = _STATS[key]
    if train_size is not None:
        if train_size < 2:
            raise ValueError(f"train_size must be >= 2, got {train_size}")
        keep = torch.randperm(len(tr_y), generator=torch.Generator().manual_seed(seed + 7))[:train_size]
        tr_x, tr_y = tr_x[keep], tr_y[keep]
    if test_size is not None and test_size < len(te_y):
        # A fixed random subset, the same for every seed: test folders and archives are often ordered by
        # class, so the first N images would be a few classes only.
        pick = torch.randperm(len(te_y), generator=torch.Generator().manual_seed(0))[:test_size].sort().values
        te_x, te_y = te_x[pick], te_y[pick]
    train_idx, val_idx = _held_out(len(tr_y), val_size, seed)
    if mean is None:
        mean, std = _channel_stats(tr_x[train_idx])
    splits = DatasetSplits(
        name=key,
        num_classes=classes,
        in_chans=tr_x.shape[1],
        image_size=tr_x.shape[-1],
        train_x=tr_x[train_idx].contiguous(),
        train_y=tr_y[train_idx].contiguous(),
        val_x=tr_x[val_idx].contiguous(),
        val_y=tr_y[val_idx].contiguous(),
        test_x=te_x.contiguous(),
        test_y=te_y.contiguous(),
        mean=tuple(float(m) for m in mean),
        std=tuple(float(s) for s in std),
        classes=class_names,
        skipped_files=skipped,
    )
    logger.debug("loaded %r", splits)
    return splits


def augment_batch(x: torch.Tensor, generator: torch.Generator | None = None, pad: int = 4) -> torch.Tensor:
    """Random pad-and-crop plus horizontal flip of a whole batch, on ``x``'s device.

    Works on any dtype; randomness is drawn on the CPU from ``generator`` so results do not depend
    on the device.
    """
    n, _, h, w = x.shape
    offs = torch.randint(0, 2 * pad + 1, (2, n), generator=generator)
    flip = torch.rand(n, generator=generator) < 0.5
    padded = F.pad(x, (pad, pad, pad, pad))
    # Build per-image gather indices: rows oy..oy+h, cols ox..ox+w (flipped where asked).
    rows = (offs[0].view(n, 1) + torch.arange(h).view(1, h)).to(x.device)
    cols = offs[1].view(n, 1) + torch.arange(w).view(1, w)
    cols = torch.where(flip.view(n, 1), cols.flip(1), cols).to(x.device)
    idx_r = rows.view(n, 1, h, 1).expand(n, x.shape[1], h, w + 2 * pad)
    out = padded.gather(2, idx_r)
    idx_c = cols.view(n, 1, 1, w).expand(n, x.shape[1], h, w)
    return out.gather(3, idx_c)


class BatchLoader:
    """Iterate mini-batches of in-memory uint8 images, augmented and normalised on the device.

    Args:
        x: uint8 images ``(N, C, H, W)``.
        y: labels ``(N,)``.
        normalize: a ``DatasetSplits`` (its mean/std are used) or a callable uint8 -> float.
        batch_size: images per batch.
        shuffle: reshuffle every epoch (from ``generator``).
        augment: pad-4 random crop + horizontal flip.
        drop_last: drop the last incomplete batch.
        device: where batches are produced; the data is moved there once.
        generator: CPU ``torch.Generator`` for shuffling and augmentation (seeded by the caller).
    """

    def __init__(
        self,
        x: torch.Tensor,
        y: torch.Tensor,
        normalize: DatasetSplits | Callable[[torch.Tensor], torch.Tensor],
        batch_size: int,
        *,
        shuffle: bool = True,
        augment: bool = False,
        drop_last: bool = False,
        device: str | torch.device = "cpu",
        generator: torch.Generator | None = None,
    ) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if len(x) != len(y):
            raise ValueError(f"x has {len(x)} images but y has {len(y)} labels")
        self.device = torch.device(device)
        self.x = x.to(self.device)
        self.y = y.to(self.device)
        self.normalize = normalize.normalize if isinstance(normalize, DatasetSplits) else normalize
        self.batch_size = batch_size
        self.shuffle = shuffle
        self.augment = augment
        self.drop_last = drop_last
        self.generator = generator if generator is not None else torch.Generator().manual_seed(0)

    def __len__(self) -> int:
        n = len(self.y)
        return n // self.batch_size if self.drop_last else math.ceil(n / self.batch_size)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        n = len(self.y)
        order = torch.randperm(n, generator=self.generator) if self.shuffle else torch.arange(n)
        order = order.to(self.device)
        for b in range(len(self)):
            idx = order[b * self.batch_size : (b + 1) * self.batch_size]
            xb = self.x.index_select(0, idx)
            if self.augment:
                xb = augment_batch(xb, self.generator)
            yield self.normalize(xb), self.y.index_select(0, idx)
