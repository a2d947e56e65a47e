"""Image classification data for training: the embedded digits, Fashion-MNIST, CIFAR, ImageFolder.

Every data set is read from the standard on-disk format (or fetched with ``download=True`` where
torchvision can); small ones are held in memory as one uint8 tensor (on the training device when
it fits) and :class:`InMemoryLoader` crops and flips a whole batch at once with a generator
seeded by (seed, epoch, batch), so a run's data stream does not depend on the number of
processes or where a resumed run restarts. File-backed ImageFolder sets go through the standard
DataLoader with workers.
(About 700 lines: one reader per on-disk format, the in-memory set they all produce, its loader.)
"""

from __future__ import annotations

import gzip
import math
import os
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from bwrf_ext.models.pretrained import IMAGENET_MEAN, IMAGENET_STD, default_shared_dir
from bwrf_ext.models.registry import ImageShape

DATASETS = ("digits", "fashion-mnist", "cifar10", "cifar100", "imagefolder")
GRAYSCALE_DATASETS = ("digits", "fashion-mnist")
# How each data set is augmented by default: (random-crop padding, horizontal flip).
DEFAULT_AUGMENT = {
    "digits": "none",
    "fashion-mnist": "crop-flip",
    "cifar10": "crop-flip",
    "cifar100": "crop-flip",
    "imagefolder": "crop-flip",
}
AUGMENTS = ("none", "flip", "crop-flip")
# What fills the border of a random crop: black pixels (torchvision's RandomCrop) or the data
# set's mean pixel, which normalises to about 0 (measured better for LSQ: see the README).
PAD_FILLS = ("black", "mean")
# The share of a GPU's free memory a data set may take to be held there (CIFAR-10: 150 MB).
DEVICE_SHARE = 0.25
CIFAR10_JPEG_NPZ = "cifar10_jpeg_q75.npz"
FASHION_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}


class DataError(ValueError):
    """A data file or directory that is not in the expected format: the message names it and
    says what was expected."""


@dataclass
class ImageData:
    """A loaded data set: train and test splits plus what a model and a log need to know.

    Attributes:
        name: the data set name (one of DATASETS).
        train, test: datasets yielding (image (C, H, W) float32 normalised, label int).
        shape: channels, height, width and number of classes the model sees.
        classes: class names.
        source: where the data came from, for the log (a file, a directory, "scikit-learn").
        mean, std: the per-channel normalisation applied.
    """

    name: str
    train: Dataset
    test: Dataset
    shape: ImageShape
    classes: list[str]
    source: str
    mean: tuple[float, ...]
    std: tuple[float, ...]
    notes: list[str] = field(default_factory=list)

    def set_epoch(self, epoch: int) -> None:
        """Reseeds the per-sample augmentation of the training items for an epoch (no-op for
        file-backed sets); training batches are reseeded by InMemoryLoader.set_epoch."""
        if isinstance(self.train, InMemoryImages):
            self.train.set_epoch(epoch)


class InMemoryImages(Dataset):
    """uint8 images held in memory, normalised and augmented per sample.

    Training and evaluation read it in batches through :class:`InMemoryLoader`; the per-sample
    items (their own stream, seeded by (seed, epoch, index)) are what the step-size calibration
    and the shape probes read, and what a plain DataLoader would.

    Args:
        images: (N, C, H, W) uint8.
        labels: (N,) int64.
        mean, std: per-channel normalisation of the [0, 1] pixels.
        augment: "none", "flip" or "crop-flip" (random crop with padding H/8, then flip).
        seed: base seed of the augmentation; sample i of epoch e uses the stream (seed, e, i).
        rgb: repeat a single channel three times (for models with an RGB stem).
        pad_fill: the crops' border, "black" (0) or "mean" (the normalisation mean's pixel,
            ``round(255 * mean)`` per channel: about 0 once normalised).
    """

    def __init__(
        self,
        images: torch.Tensor,
        labels: torch.Tensor,
        mean: tuple[float, ...],
        std: tuple[float, ...],
        augment: str = "none",
        seed: int = 0,
        rgb: bool = False,
        pad_fill: str = "black",
    ) -> None:
        if images.dtype != torch.uint8 or images.dim() != 4:
            raise ValueError(
                f"InMemoryImages: images must be uint8 (N, C, H, W), got {images.dtype} "
                f"{tuple(images.shape)}"
            )
        if augment not in AUGMENTS:
            raise ValueError(f"InMemoryImages: augment must be one of {AUGMENTS}, got {augment!r}")
        if pad_fill not in PAD_FILLS:
            raise ValueError(
                f"InMemoryImages: pad_fill must be one of {PAD_FILLS}, got {pad_fill!r}"
            )
        self.images = images
        self.labels = labels.long()
        channels = images.shape[1] * (3 if rgb and images.shape[1] == 1 else 1)
        self.mean = torch.tensor(mean).repeat(channels // len(mean)).view(-1, 1, 1)
        self.std = torch.tensor(std).repeat(channels // len(std)).view(-1, 1, 1)
        self.augment = augment
        self.seed = seed
        self.rgb = rgb
        self.epoch = 0
        self.padding = images.shape[-1] // 8
        self.pad_fill = pad_fill
        # The border pixel per image channel (a grayscale image repeated for an RGB model takes
        # the mean of the repeated channels' means); None: black, crop_flip's fast path.
        self.fill = None
        if pad_fill == "mean":
            means, c = torch.tensor(mean, dtype=torch.float64), images.shape[1]
            means = means.view(c, -1).mean(1) if means.numel() % c == 0 else means.mean().expand(c)
            self.fill = (means * 255).round().to(torch.uint8)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def subset(self, indices: torch.Tensor | Sequence[int]) -> InMemoryImages:
        """The images at ``indices``, in that order, normalised and augmented as this set is.

        Args:
            indices: (M,) positions into this set.
        """
        index = torch.as_tensor(indices, dtype=torch.long)
        # self.mean/std hold the constructor's values repeated per channel: passed back, they
        # repeat once (the same float32 values).
        subset = InMemoryImages(
            self.images[index], self.labels[index], tuple(self.mean.flatten().tolist()),
            tuple(self.std.flatten().tolist()), self.augment, self.seed, self.rgb, self.pad_fill,
        )  # fmt: skip
        subset.set_epoch(self.epoch)
        return subset

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        if self.augment == "none":
            image = self.images[index]
        else:  # the loader's crop_flip on a batch of one, drawn from the sample's own stream
            rng = np.random.default_rng((self.seed, self.epoch, int(index)))
            padding = self.padding if self.augment == "crop-flip" else 0
            dy, dx = rng.integers(0, 2 * padding + 1, size=2) if padding else (0, 0)
            flip = int(rng.random() < 0.5)
            one = [torch.tensor([int(v)]) for v in (index, dy, dx, flip)]
            image = crop_flip(self.images, *one, padding, self.fill)[0]
        return normalize(image, self.mean, self.std, self.rgb), int(self.labels[index])


def normalize(
    images: torch.Tensor, mean: torch.Tensor, std: torch.Tensor, rgb: bool
) -> torch.Tensor:
    """uint8 pixels as the model sees them: [0, 1], one channel repeated for an RGB model,
    normalised per channel.

    Args:
        images: (..., C, H, W) uint8.
        mean, std: (C', 1, 1) float32 on the images' device (C' = 3 where rgb repeats C = 1).
        rgb: repeat a single channel three times.

    Returns:
        (..., C', H, W) float32.
    """
    x = images.float().div_(255.0)
    if rgb and x.shape[-3] == 1:
        x = x.expand(*x.shape[:-3], 3, *x.shape[-2:])
    return (x - mean).div_(std)


class InMemoryLoader:
    """Batches of an :class:`InMemoryImages` set, augmented a whole batch at a time on the
    training device; one process's share of each global batch.

    The order of an epoch is DistributedSampler's: ``torch.randperm`` seeded with seed + epoch
    when shuffled, else the set's own. Global batch k holds positions [kB, (k+1)B) of it; its
    crop offsets and flips are drawn for all B images from one generator seeded by
    (seed, epoch, k), and process ``rank`` of ``world_size`` takes rows rank, rank + world_size,
    ... of that draw (DistributedSampler's assignment). So the union of the processes' batches,
    pixels included, is the same for any number of processes, and an epoch started anew after
    :meth:`set_epoch` (a resumed run) is the same as in an uninterrupted run.

    Crop-flip is RandomCrop(H, padding=W // 8) (its border: the set's ``pad_fill``), then a
    horizontal flip with probability 1/2, as the per-sample items do, but the stream differs
    from theirs (one draw per batch, not per image): runs before issue 20 saw other crops.

    Args:
        dataset: the images with their normalisation, augmentation and seed.
        batch_size: B, the global batch of all processes together; a multiple of world_size.
        shuffle: a new order every epoch (training), else the set's order (evaluation).
        drop_last: leave out a last global batch shorter than B.
        world_size, rank: the processes and this one.
        device: where batches are made. The uint8 images are copied there when they take at
            most DEVICE_SHARE of its free memory, else they stay in host memory and each batch
            is made there and copied over.

    Yields:
        (x, y): x (b, C, H, W) float32 normalised, y (b,) int64, on ``device``;
        b = B / world_size (fewer in a short last batch, of which a process with no rows
        yields nothing).
    """

    def __init__(
        self,
        dataset: InMemoryImages,
        batch_size: int,
        *,
        shuffle: bool = False,
        drop_last: bool = False,
        world_size: int = 1,
        rank: int = 0,
        device: torch.device | str = "cpu",
    ) -> None:
        if batch_size < 1 or batch_size % world_size:
            raise ValueError(
                f"InMemoryLoader: batch_size must be a positive multiple of world_size "
                f"{world_size}, got {batch_size}"
            )
        if not 0 <= rank < world_size:
            raise ValueError(f"InMemoryLoader: rank must be in [0, {world_size}), got {rank}")
        self.dataset = dataset
        self.batch_size = batch_size
        self.shuffle = shuffle
        self.drop_last = drop_last
        self.world_size = world_size
        self.rank = rank
        self.device = torch.device(device)
        self.epoch = 0
        home = self.device if _fits(dataset.images, self.device) else torch.device("cpu")
        self.images = dataset.images.to(home)
        self.fill = None if dataset.fill is None else dataset.fill.to(home)  # moved once
        self.labels = dataset.labels  # indexed on CPU, where the order is: one small copy
        self.mean = dataset.mean.to(self.device)
        self.std = dataset.std.to(self.device)
        self.padding = dataset.padding if dataset.augment == "crop-flip" else 0

    def set_epoch(self, epoch: int) -> None:
        """Selects the order and the augmentation of ``epoch`` for the next iteration."""
        self.epoch = epoch

    def __len__(self) -> int:
        """The batches this process yields: those of the global batches it has rows of."""
        full, tail = divmod(len(self.labels), self.batch_size)
        return full + (not self.drop_last and tail > self.rank)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        n, size = len(self.labels), self.batch_size
        if self.shuffle:
            g = torch.Generator()
            g.manual_seed(self.dataset.seed + self.epoch)  # as DistributedSampler seeds it
            order = torch.randperm(n, generator=g)
        else:
            order = torch.arange(n)
        for k in range(len(self)):
            batch = order[k * size : (k + 1) * size]
            yield self._batch(batch[self.rank :: self.world_size], k, len(batch))

    def draws(self, k: int, size: int) -> torch.Tensor:
        """The augmentation of global batch ``k`` (``size`` images) of the current epoch.

        One generator, ``np.random.default_rng((seed, epoch, k))``, draws the window corners
        ``integers(0, 2p + 1, size=(2, size))`` (rows dy, dx; crop-flip only, else 0) and then
        the flips ``random(size) < 0.5`` ("none": no draw, all 0).

        Returns:
            (3, size) int64 on CPU: dy, dx and flip (0 or 1) of each image of the global batch.
        """
        ds, draws = self.dataset, np.zeros((3, size), dtype=np.int64)
        if ds.augment != "none":
            rng = np.random.default_rng((ds.seed, self.epoch, k))
            if self.padding:
                draws[:2] = rng.integers(0, 2 * self.padding + 1, size=(2, size))
            draws[2] = rng.random(size) < 0.5
        return torch.from_numpy(draws)

    def _batch(
        self, index: torch.Tensor, k: int, global_size: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """This process's rows ``index`` (CPU) of global batch ``k`` (of ``global_size``)."""
        if self.dataset.augment == "none":
            images = self.images[index.to(self.images.device, non_blocking=True)]
        else:
            # Drawn for the whole global batch; this process keeps its columns.
            dy, dx, flip = self.draws(k, global_size)[:, self.rank :: self.world_size]
            images = crop_flip(self.images, index, dy, dx, flip, self.padding, self.fill)
        x = normalize(
            images.to(self.device, non_blocking=True), self.mean, self.std, self.dataset.rgb
        )
        return x, self.labels[index].to(self.device, non_blocking=True)


def crop_flip(
    images: torch.Tensor,
    index: torch.Tensor,
    dy: torch.Tensor,
    dx: torch.Tensor,
    flip: torch.Tensor,
    padding: int,
    fill: torch.Tensor | None = None,
) -> torch.Tensor:
    """Windows of padded images, some mirrored: one gather, no padded copy.

    Image j of the result is ``F.pad(images[index[j]], (p,) * 4)[:, dy[j] : dy[j] + H,
    dx[j] : dx[j] + W]`` with the border filled by ``fill``, flipped left-right where
    ``flip[j]`` is 1.

    Args:
        images: (N, C, H, W) uint8, the whole set (contiguous), on any device.
        index: (B,) int64 on CPU, the images to take.
        dy, dx: (B,) int64 on CPU in [0, 2 * padding], the window's corner in the padded image.
        flip: (B,) int64 on CPU, 0 or 1.
        padding: p, the border on each side.
        fill: (C,) uint8, the border's pixel per channel; None: black (0).

    Returns:
        (B, C, H, W) uint8 on the images' device.
    """
    _, c, h, w = images.shape
    i, j = torch.arange(h), torch.arange(w)
    # Per image, the source row and column of every output row and column in the unpadded
    # image (outside it: the zero border). These (B, H) and (B, W) tables are made on CPU and
    # cross to the device in one copy, which then runs four kernels on (B, C, H, W).
    rows = dy[:, None] - padding + i
    cols = torch.where(flip[:, None].bool(), w - 1 - j, j) + dx[:, None] - padding
    tables = torch.cat([
        (index * (c * h * w))[:, None] + rows.clamp(0, h - 1) * w, cols.clamp(0, w - 1),
        (rows >= 0) & (rows < h), (cols >= 0) & (cols < w),
    ], 1).to(images.device, non_blocking=True)  # fmt: skip
    row_at, col_at, row_in, col_in = tables.split([h, w, h, w], 1)
    channel_at = torch.arange(0, c * h * w, h * w, device=images.device)[:, None, None]
    linear = row_at[:, None, :, None] + channel_at + col_at[:, None, None, :]
    inside = row_in[:, None, :, None] & col_in[:, None, None, :]
    if fill is None:
        return torch.take(images, linear) * inside.to(torch.uint8)
    border = fill.to(images.device, non_blocking=True).view(1, c, 1, 1)
    return torch.where(inside.bool(), torch.take(images, linear), border)


def _fits(images: torch.Tensor, device: torch.device) -> bool:
    """Whether ``images`` may be held on ``device`` (host memory: always)."""
    if device.type != "cuda":
        return True
    free, _ = torch.cuda.mem_get_info(device)
    return images.numel() * images.element_size() <= DEVICE_SHARE * free


def channel_stats(images: torch.Tensor) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and std of uint8 (N, C, H, W) images scaled to [0, 1]."""
    x = images.float().div_(255.0).transpose(0, 1).reshape(images.shape[1], -1)
    return tuple(x.mean(1).tolist()), tuple(x.std(1).tolist())


def load_image_data(
    name: str,
    data_dir: str | os.PathLike | None = None,
    *,
    download: bool = False,
    augment: str = "auto",
    pad_fill: str = "black",
    normalization: str = "dataset",
    seed: int = 0,
    rgb: bool = False,
    image_size: int = 224,
) -> ImageData:
    """Loads a data set by name.

    Args:
        name: one of DATASETS.
        data_dir: where to look (None: ``./data``, then the repository's ``../shared/data``, then
            ``/usr/share/datasets``); ignored for digits.
        download: fetch CIFAR or Fashion-MNIST into data_dir with torchvision if it is absent.
        augment: "auto" (the data set's usual: DEFAULT_AUGMENT), or one of AUGMENTS.
        pad_fill: the random crops' border (one of PAD_FILLS; in-memory sets, whose crops
            pad: imagefolder's RandomResizedCrop does not).
        normalization: "dataset" (the training split's own per-channel statistics) or
            "imagenet" (ImageNet's mean/std, which the ../shared CIFAR ResNet weights expect);
            imagefolder always uses ImageNet's.
        seed: augmentation seed.
        rgb: give 3-channel images even for grayscale data (torchvision models).
        image_size: side of the crops for imagefolder.

    Raises:
        ValueError: an unknown name, augmentation or normalisation.
        FileNotFoundError: the data is not where it was looked for, naming every place and
            the option that fetches it.
        DataError: a file that is there but unreadable or not in the expected format (named,
            with what was expected).
    """
    if name not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}; choose one of {', '.join(DATASETS)}")
    if augment == "auto":
        augment = DEFAULT_AUGMENT[name]
    if augment not in AUGMENTS:
        raise ValueError(f"augment must be 'auto' or one of {AUGMENTS}, got {augment!r}")
    if pad_fill not in PAD_FILLS:
        raise ValueError(f"pad_fill must be one of {PAD_FILLS}, got {pad_fill!r}")
    if normalization not in ("dataset", "imagenet"):
        raise ValueError(
            f"normalization must be 'dataset' or 'imagenet', got {normalization!r}"
        )
    if name == "imagefolder":
        return _image_folder(data_dir, augment, image_size)
    loaders = {
        "digits": _digits,
        "fashion-mnist": _fashion_mnist,
        "cifar10": _cifar10,
        "cifar100": _cifar100,
    }
    train, test, classes, source, notes = loaders[name](
        None if data_dir is None else Path(data_dir), download
    )
    for split_name, (images, labels) in (("train", train), ("test", test)):
        _check_split(split_name, images, labels, len(classes), source)
    if normalization == "imagenet":
        # Grayscale images given to an RGB model are repeated to 3 channels, then normalised.
        if train[0].shape[1] != 3 and not rgb:
            raise ValueError(f"normalization='imagenet' needs RGB images; {name} is grayscale")
        mean, std = IMAGENET_MEAN, IMAGENET_STD
    else:
        mean, std = channel_stats(train[0])
    images = train[0]
    shape = ImageShape(
        3 if rgb else images.shape[1], images.shape[2], images.shape[3], len(classes)
    )
    return ImageData(
        name,
        InMemoryImages(*train, mean, std, augment, seed, rgb, pad_fill),
        InMemoryImages(*test, mean, std, "none", seed, rgb),
        shape,
        classes,
        source,
        tuple(mean),
        tuple(std),
        notes,
    )


def _check_split(
    split: str, images: torch.Tensor, labels: torch.Tensor, num_classes: int, source: str
) -> None:
    """What training indexes with: N uint8 images, N labels in [0, num_classes)."""
    if images.dim() != 4 or labels.dim() != 1 or len(images) != len(labels) or not len(labels):
        raise DataError(
            f"{source}: expected N >= 1 {split} images (N, C, H, W) and N labels, got images "
            f"{tuple(images.shape)} and labels {tuple(labels.shape)}"
        )
    low, high = int(labels.min()), int(labels.max())
    if low < 0 or high >= num_classes:
        raise DataError(
            f"{source}: {split} labels must lie in [0, {num_classes - 1}] ({num_classes} "
            f"classes), got [{low}, {high}]"
        )


def _cause(error: Exception) -> str:
    """An exception as "Type: its first sentence" (library messages can run for lines)."""
    text = re.split(r"(?<=[.!])\s|\n", str(error).strip(), maxsplit=1)[0].rstrip(".")
    return f"{type(error).__name__}: {text}" if text else type(error).__name__


def _search_dirs(data_dir: Path | None, *system: str) -> list[Path]:
    if data_dir is not None:
        return [data_dir]
    return [Path("data"), default_shared_dir() / "data", *(Path(s) for s in system)]


def _not_found(what: str, places: list[Path], expected: str, downloadable: bool) -> None:
    where = ", ".join(str(p) for p in places)
    hint = " or pass --download to fetch it there" if downloadable else ""
    raise FileNotFoundError(
        f"{what} not found: looked for {expected} in {where}; point --data-dir at it{hint}"
    )


Split = tuple[torch.Tensor, torch.Tensor]


def _digits(data_dir: Path | None, download: bool):
    """scikit-learn's 1,797 8x8 digits (bundled in its wheel), split 80/20 stratified, fixed."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    images, labels = load_digits(return_X_y=True)
    # Pixels are 0..16; stored as uint8 0..255 like every other set.
    x = torch.from_numpy(np.rint(images * (255.0 / 16.0)).astype(np.uint8)).view(-1, 1, 8, 8)
    y = torch.from_numpy(labels).long()
    train_idx, test_idx = train_test_split(
        np.arange(len(y)), test_size=0.2, stratify=labels, random_state=0
    )
    train_idx, test_idx = torch.from_numpy(train_idx), torch.from_numpy(test_idx)
    classes = [str(i) for i in range(10)]
    return (x[train_idx], y[train_idx]), (x[test_idx], y[test_idx]), classes, "scikit-learn", []


def _read_idx(path: Path) -> np.ndarray:
    """An MNIST-style idx file of unsigned bytes (optionally .gz) as a numpy array.

    Raises:
        DataError: unreadable, not an idx file of unsigned bytes, or shorter than its header says.
    """
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            data = f.read()
    except (OSError, EOFError) as error:  # gzip.BadGzipFile is an OSError
        raise DataError(f"cannot read {path}: {error}") from None
    if len(data) < 4 or data[:3] != b"\x00\x00\x08" or not 1 <= data[3] <= 4:
        raise DataError(
            f"{path} is not an MNIST idx file of unsigned bytes: expected the magic number "
            f"0x0000080N (N = 1..4 dimensions), got "
            f"{'0x' + data[:4].hex() if data else 'an empty file'}"
        )
    ndim = data[3]
    header = 4 + 4 * ndim
    dims = [int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim)]
    needed = header + math.prod(dims)
    if len(data) < needed:
        raise DataError(
            f"{path} is truncated: its header announces {'x'.join(map(str, dims))} bytes "
            f"({needed} with the header), the file holds {len(data)}"
        )
    return np.frombuffer(data, dtype=np.uint8, count=needed - header, offset=header).reshape(dims)


def _find_idx(directory: Path, stem: str) -> Path | None:
    for sub in ("", "FashionMNIST/raw", "raw"):
        for suffix in ("", ".gz"):
            candidate = directory / sub / (stem + suffix)
            if candidate.is_file():
                return candidate
    return None


def _fashion_mnist(data_dir: Path | None, download: bool):
    places = _search_dirs(data_dir, "/usr/share/datasets/fashion-mnist")
    if download:
        from torchvision.datasets import FashionMNIST

        FashionMNIST(str(places[0]), train=True, download=True)
        FashionMNIST(str(places[0]), train=False, download=True)
    for directory in places:
        files = {
            split: [_find_idx(directory, stem) for stem in stems]
            for split, stems in FASHION_FILES.items()
        }
        if all(p is not None for ps in files.values() for p in ps):
            splits = []
            for split in ("train", "test"):
                images, labels = (_read_idx(p) for p in files[split])
                if images.ndim != 3 or labels.ndim != 1:
                    raise DataError(
                        f"{files[split][0]} and {files[split][1]}: expected (N, H, W) images and "
                        f"(N,) labels, got {images.shape} and {labels.shape}"
                    )
                splits.append(
                    (torch.from_numpy(images.copy()).unsqueeze(1), torch.from_numpy(labels.copy()))
                )
            classes = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal",
                       "Shirt", "Sneaker", "Bag", "Ankle boot"]  # fmt: skip
            return splits[0], splits[1], classes, str(directory), []
    _not_found("Fashion-MNIST", places, "{train,t10k}-{images-idx3,labels-idx1}-ubyte[.gz]", True)


def _cifar_pickles(directory: Path, cifar100: bool, download: bool) -> tuple[Split, Split, list]:
    from torchvision.datasets import CIFAR10, CIFAR100

    cls = CIFAR100 if cifar100 else CIFAR10
    splits = []
    for train in (True, False):
        try:
            ds = cls(str(directory), train=train, download=download)
        except RuntimeError as error:  # torchvision's integrity check: files missing or altered
            files = ("train, test and meta" if cifar100
                     else "data_batch_1..5, test_batch and batches.meta")  # fmt: skip
            raise DataError(
                f"{directory / cls.base_folder} is incomplete or corrupt: expected {files} of "
                f"the python version, as unpacked from {cls.filename} (torchvision: "
                f"{_cause(error)}); pass --download to fetch them"
            ) from None
        images = torch.from_numpy(ds.data).permute(0, 3, 1, 2).contiguous()
        splits.append((images, torch.tensor(ds.targets)))
    return splits[0], splits[1], list(ds.classes)


def _cifar10(data_dir: Path | None, download: bool):
    places = _search_dirs(data_dir)
    if download:
        train, test, classes = _cifar_pickles(places[0], False, True)
        return train, test, classes, str(places[0]), []
    for directory in places:
        if (directory / "cifar-10-batches-py").is_dir():
            train, test, classes = _cifar_pickles(directory, False, False)
            return train, test, classes, str(directory / "cifar-10-batches-py"), []
        for folder in (directory, directory / "cifar10_jpeg_q75"):
            npz = folder / CIFAR10_JPEG_NPZ
            if npz.is_file():
                return (*_cifar10_jpeg(npz), [
                    "CIFAR-10 from the lossy JPEG-q75 copy: accuracies are not comparable with "
                    "numbers on the exact CIFAR-10 test set"
                ])
    _not_found("CIFAR-10", places, f"cifar-10-batches-py/ or {CIFAR10_JPEG_NPZ}", True)


def _cifar10_jpeg(npz_path: Path):
    """The JPEG-q75 CIFAR-10 copy in ../shared/data (class-sorted; see its README).

    Raises:
        DataError: the file is not such an archive (truncated, another file, other keys).
    """
    try:
        return _read_cifar10_jpeg(npz_path)
    except Exception as error:  # any failure to read it means it is not the expected archive
        raise DataError(
            f"{npz_path} is not a readable CIFAR-10 JPEG archive: expected a NumPy .npz holding "
            "train_jpeg, train_offsets, train_labels, test_jpeg, test_offsets, test_labels and "
            f"classes ({_cause(error)})"
        ) from None


def _read_cifar10_jpeg(npz_path: Path):
    from torchvision.io import ImageReadMode, decode_jpeg

    with np.load(npz_path) as npz:
        splits = []
        for split in ("train", "test"):
            data, offsets = npz[f"{split}_jpeg"], npz[f"{split}_offsets"]
            buffers = [
                torch.from_numpy(data[offsets[i] : offsets[i + 1]].copy())
                for i in range(len(offsets) - 1)
            ]
            images = torch.stack(decode_jpeg(buffers, mode=ImageReadMode.RGB))
            splits.append((images, torch.from_numpy(npz[f"{split}_labels"]).long()))
        classes = [str(c) for c in npz["classes"]]
    return splits[0], splits[1], classes, str(npz_path)


def _cifar100(data_dir: Path | None, download: bool):
    places = _search_dirs(data_dir)
    for directory in places[:1] if download else places:
        if download or (directory / "cifar-100-python").is_dir():
            train, test, classes = _cifar_pickles(directory, True, download)
            return train, test, classes, str(directory / "cifar-100-python"), []
    _not_found("CIFAR-100", places, "cifar-100-python/", True)


def _image_folder(data_dir: str | os.PathLike | None, augment: str, image_size: int) -> ImageData:
    """``data_dir/train/<class>/*`` and ``data_dir/val/<class>/*`` (or ``test/``), read lazily."""
    from torchvision import datasets, transforms

    if data_dir is None:
        raise ValueError("--dataset imagefolder needs --data-dir (holding train/ and val/)")
    root = Path(data_dir)
    test_dir = next((root / d for d in ("val", "test") if (root / d).is_dir()), None)
    if not (root / "train").is_dir() or test_dir is None:
        raise FileNotFoundError(
            f"imagefolder: {root} must hold train/<class>/ and val/<class>/ (or test/<class>/)"
        )
    # Natural images: ImageNet statistics either way (a pass over the files to measure the
    # set's own would cost a whole epoch of decoding).
    mean, std = IMAGENET_MEAN, IMAGENET_STD
    crop = (
        [transforms.RandomResizedCrop(image_size)] if augment == "crop-flip"
        else [transforms.Resize(image_size), transforms.CenterCrop(image_size)]
    )  # fmt: skip
    flip = [transforms.RandomHorizontalFlip()] if augment != "none" else []
    to_tensor = [transforms.ToTensor(), transforms.Normalize(mean, std)]
    train = datasets.ImageFolder(str(root / "train"), transforms.Compose(crop + flip + to_tensor))
    test = datasets.ImageFolder(
        str(test_dir),
        transforms.Compose(
            [transforms.Resize(int(image_size * 8 / 7)), transforms.CenterCrop(image_size)]
            + to_tensor
        ),
    )
    if train.classes != test.classes:
        raise ValueError(
            f"imagefolder: train/ and {test_dir.name}/ have different classes "
            f"({len(train.classes)} vs {len(test.classes)})"
        )
    shape = ImageShape(3, image_size, image_size, len(train.classes))
    return ImageData(
        "imagefolder",
        train,
        test,
        shape,
        train.classes,
        str(root),
        mean,
        std,
        ["ImageFolder augmentation draws from the global RNG (not per-sample seeded)"],
    )


__all__ = [
    "DATASETS",
    "GRAYSCALE_DATASETS",
    "DataError",
    "ImageData",
    "InMemoryImages",
    "InMemoryLoader",
    "channel_stats",
    "crop_flip",
    "load_image_data",
    "normalize",
]
