"""bwrf_ext.data and the model registry: formats, splits, augmentation, normalisation."""

from __future__ import annotations

import gzip
import hashlib
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from bwrf_ext.data import (
    InMemoryImages,
    InMemoryLoader,
    _cifar10_jpeg,
    _read_idx,
    load_image_data,
)
from bwrf_ext.engine import split_model
from bwrf_ext.models.pretrained import IMAGENET_MEAN, IMAGENET_STD, default_shared_dir
from bwrf_ext.models.registry import ImageShape, build_model, model_names

JPEG_NPZ = default_shared_dir() / "data" / "cifar10_jpeg_q75" / "cifar10_jpeg_q75.npz"
FASHION = Path("/usr/share/datasets/fashion-mnist")


def test_digits_split_and_normalisation():
    from sklearn.datasets import load_digits

    data = load_image_data("digits")
    assert (len(data.train), len(data.test)) == (1437, 360)
    assert data.shape == ImageShape(1, 8, 8, 10)
    x = torch.stack([data.train[i][0] for i in range(len(data.train))])
    # Normalised with the training split's own statistics: mean 0, std 1 there.
    assert x.mean().item() == pytest.approx(0.0, abs=1e-5)
    assert x.std().item() == pytest.approx(1.0, abs=1e-3)
    # Pixels are scikit-learn's 0..16 values scaled to 0..255 (rounding: at most half a level).
    raw = load_digits().images.reshape(-1) * (255 / 16)
    stored = torch.cat([data.train.images.flatten(), data.test.images.flatten()]).double()
    assert sorted(np.unique(np.rint(raw))) == sorted(stored.unique().tolist())
    # The split is fixed, whatever the training seed.
    again = load_image_data("digits", seed=7)
    assert torch.equal(again.test.images, data.test.images)


def test_augmentation_is_seeded_per_sample_and_epoch():
    images = torch.randint(0, 256, (6, 3, 16, 16), dtype=torch.uint8)
    labels = torch.arange(6)
    ds = InMemoryImages(images, labels, (0.5,) * 3, (0.25,) * 3, augment="crop-flip", seed=3)
    first = [ds[i][0] for i in range(6)]
    assert all(torch.equal(a, ds[i][0]) for i, a in enumerate(first))  # same stream
    ds.set_epoch(1)
    assert any(not torch.equal(a, ds[i][0]) for i, a in enumerate(first))  # new epoch, new crops
    plain = InMemoryImages(images, labels, (0.5,) * 3, (0.25,) * 3)
    x, y = plain[2]
    torch.testing.assert_close(x, (images[2].float() / 255 - 0.5) / 0.25)
    assert y == 2
    # A crop-flip sample is a flipped/shifted copy of the image: its centre pixels exist there.
    ds.set_epoch(0)
    aug = ds[0][0] * 0.25 + 0.5
    assert aug.shape == (3, 16, 16) and aug.min() >= 0


def test_subset_is_those_images_in_that_order_normalised_alike():
    """subset() keeps the normalisation (per channel, repeated for an RGB model) and the
    augmentation settings; without augmentation item j is the parent's item indices[j]."""
    images = torch.randint(0, 256, (6, 1, 8, 8), dtype=torch.uint8)
    labels = torch.tensor([0, 1, 0, 1, 2, 2])
    ds = InMemoryImages(images, labels, (0.3,), (0.2,), rgb=True)
    picked = [4, 1, 5]
    subset = ds.subset(picked)
    assert len(subset) == 3 and torch.equal(subset.labels, labels[picked])
    for j, i in enumerate(picked):
        x, y = subset[j]
        assert x.shape == (3, 8, 8) and y == int(labels[i])
        assert torch.equal(x, ds[i][0])
    augmented = InMemoryImages(images, labels, (0.3,), (0.2,), augment="flip", seed=5)
    augmented.set_epoch(3)
    kept = augmented.subset(torch.tensor([2, 0]))
    assert (kept.augment, kept.seed, kept.epoch) == ("flip", 5, 3)
    assert torch.equal(kept.images, images[[2, 0]])


@pytest.mark.parametrize(
    ("channels", "mean", "rgb", "fill"),
    [(3, IMAGENET_MEAN, False, [124, 116, 104]), (1, IMAGENET_MEAN, True, [114]),
     (3, (0.5,), False, [128] * 3), (1, (0.3,), False, [76])],
)  # fmt: skip
def test_mean_fill_is_the_normalisation_mean_pixel(channels, mean, rgb, fill):
    """pad_fill="mean" borders the crops with round(255 * mean) per channel (a grayscale image
    for an RGB model: the mean of the three means), about 0 once normalised; the per-sample
    items and subset() use it too; an unknown fill is refused, naming the argument."""
    images = torch.full((16, channels, 8, 8), 255, dtype=torch.uint8)  # white: the border shows
    ds = InMemoryImages(images, torch.arange(16), mean, (0.25,), "crop-flip", 1, rgb, "mean")
    assert ds.fill.tolist() == fill
    x, _ = next(iter(InMemoryLoader(ds, 16, shuffle=True)))
    items = torch.stack([ds[i][0] for i in range(16)])
    for batch in (x, items):
        border = batch[batch < 1.0]  # white normalises to >= 2, the border to about 0
        assert border.numel() > 0
        # Within half a grey level of 0; a grayscale border repeated to RGB cannot be 0 in all
        # three channels at once (their means differ), only in their mean.
        limit = 0.5 / 255 / 0.25 + 1e-6 if not rgb else 0.2
        assert border.abs().max() < limit
    assert ds.subset([1, 2]).pad_fill == "mean"
    with pytest.raises(ValueError, match="pad_fill must be one of"):
        InMemoryImages(images, torch.arange(4), mean, (0.25,), "crop-flip", pad_fill="grey")
    with pytest.raises(ValueError, match="pad_fill must be one of"):
        load_image_data("digits", pad_fill="white")


def expected_batches(ds: InMemoryImages, batch: int, epoch: int) -> list[tuple]:
    """The documented stream of InMemoryLoader(ds, batch, shuffle=True, drop_last=True) in
    ``epoch``, built per image with F.pad, slicing and flip (the per-sample items' ops)."""
    g = torch.Generator()
    g.manual_seed(ds.seed + epoch)
    order = torch.randperm(len(ds), generator=g)
    p, (h, w) = ds.padding, ds.images.shape[-2:]
    batches = []
    for k in range(len(ds) // batch):
        index = order[k * batch : (k + 1) * batch]
        rng = np.random.default_rng((ds.seed, epoch, k))
        dy, dx = rng.integers(0, 2 * p + 1, size=(2, batch))
        flips = rng.random(batch) < 0.5
        images = []
        fill = [0] * ds.images.shape[1] if ds.fill is None else ds.fill.tolist()
        for j, i in enumerate(index.tolist()):
            padded = torch.stack([F.pad(channel, (p, p, p, p), value=value)
                                  for channel, value in zip(ds.images[i], fill, strict=True)])
            image = padded[:, dy[j] : dy[j] + h, dx[j] : dx[j] + w]
            x = (image.flip(-1) if flips[j] else image).float() / 255.0
            if ds.rgb:
                x = x.expand(3, -1, -1)
            images.append((x - ds.mean) / ds.std)
        batches.append((torch.stack(images), ds.labels[index]))
    return batches


@pytest.mark.parametrize("pad_fill", ["black", "mean"])
def test_batched_crops_and_flips_are_the_documented_draws(pad_fill):
    """Batch k of epoch e: the permutation seeded with seed + e (DistributedSampler's), crops
    and flips from one generator seeded by (seed, e, k), the border black or the mean pixel;
    a fresh loader set to epoch e (a resumed run) gives the same batches as one that went
    through the epochs before."""
    images = torch.randint(0, 256, (22, 1, 16, 16), dtype=torch.uint8)
    ds = InMemoryImages(images, torch.arange(22) % 5, (0.4,), (0.3,), "crop-flip", 7, rgb=True,
                        pad_fill=pad_fill)  # fmt: skip
    loader = InMemoryLoader(ds, 4, shuffle=True, drop_last=True)
    assert len(loader) == 5
    seen = []
    for epoch in range(3):
        loader.set_epoch(epoch)
        batches = list(loader)
        expected = expected_batches(ds, 4, epoch)
        assert len(batches) == len(expected) == 5
        for (x, y), (ex, ey) in zip(batches, expected, strict=True):
            assert x.shape == (4, 3, 16, 16) and x.dtype == torch.float32
            assert torch.equal(x, ex) and torch.equal(y, ey)
        seen.append(batches)
    assert not torch.equal(seen[1][0][0], seen[2][0][0])  # a new epoch, new batches
    resumed = InMemoryLoader(ds, 4, shuffle=True, drop_last=True)
    resumed.set_epoch(2)
    for (x, y), (sx, sy) in zip(resumed, seen[2], strict=True):
        assert torch.equal(x, sx) and torch.equal(y, sy)
    # Every offset and both flips occur: the draws cover the whole range.
    draws = torch.cat([loader.draws(k, 4) for k in range(60)], 1)
    assert set(draws[0].tolist()) == set(draws[1].tolist()) == set(range(5))
    assert set(draws[2].tolist()) == {0, 1}


@pytest.mark.parametrize("augment", ["crop-flip", "flip", "none"])
def test_batches_do_not_depend_on_the_number_of_processes(augment):
    """Rank r of W yields rows r, r + W, ... of the one-process global batch, pixels and all."""
    images = torch.randint(0, 256, (30, 3, 8, 8), dtype=torch.uint8)
    ds = InMemoryImages(images, torch.arange(30), (0.5,) * 3, (0.2,) * 3, augment, seed=2)
    single = InMemoryLoader(ds, 8, shuffle=True, drop_last=True)
    single.set_epoch(4)
    whole = list(single)
    for world in (2, 4, 8):
        ranks = [
            InMemoryLoader(ds, 8, shuffle=True, drop_last=True, world_size=world, rank=r)
            for r in range(world)
        ]
        for rank in ranks:
            rank.set_epoch(4)
            assert len(rank) == len(single) == 3
        for (x, y), shares in zip(whole, zip(*ranks, strict=True), strict=True):
            for r, (xr, yr) in enumerate(shares):
                assert torch.equal(xr, x[r::world]) and torch.equal(yr, y[r::world])
    with pytest.raises(ValueError, match="batch_size must be a positive multiple of world_size"):
        InMemoryLoader(ds, 6, world_size=4, rank=0)


def test_evaluation_batches_are_the_per_sample_items():
    """Unshuffled and unaugmented, a process's batches are the items of its share
    (range(rank, n, world_size)) in order, bit for bit; a short last batch is shared out and
    a process with no rows of it yields nothing."""
    images = torch.randint(0, 256, (10, 1, 8, 8), dtype=torch.uint8)
    ds = InMemoryImages(images, torch.arange(10), (0.3,), (0.2,), rgb=True)
    for rank in range(4):
        loader = InMemoryLoader(ds, 8, world_size=4, rank=rank)
        batches = list(loader)
        assert len(batches) == len(loader) == (2 if rank < 2 else 1)
        x, y = (torch.cat(parts) for parts in zip(*batches, strict=True))
        share = list(range(rank, 10, 4))
        assert torch.equal(y, torch.tensor(share))
        assert torch.equal(x, torch.stack([ds[i][0] for i in share]))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_batches_on_the_gpu_are_those_on_the_cpu():
    """The uint8 set moves to the GPU (it fits); crops are gathers and normalisation is
    elementwise IEEE arithmetic, so the batches are bitwise the CPU's."""
    images = torch.randint(0, 256, (40, 3, 32, 32), dtype=torch.uint8)
    ds = InMemoryImages(images, torch.arange(40), (0.5,) * 3, (0.2,) * 3, "crop-flip", seed=1)
    cpu = InMemoryLoader(ds, 16, shuffle=True, drop_last=True)
    gpu = InMemoryLoader(ds, 16, shuffle=True, drop_last=True, device="cuda")
    assert gpu.images.is_cuda
    for (x, y), (gx, gy) in zip(cpu, gpu, strict=True):
        assert gx.is_cuda and torch.equal(gx.cpu(), x) and torch.equal(gy.cpu(), y)


def test_read_idx_round_trip(tmp_path):
    array = np.random.default_rng(0).integers(0, 256, (5, 28, 28), dtype=np.uint8)
    header = bytes([0, 0, 8, 3]) + b"".join(d.to_bytes(4, "big") for d in array.shape)
    path = tmp_path / "images-idx3-ubyte.gz"
    with gzip.open(path, "wb") as f:
        f.write(header + array.tobytes())
    assert np.array_equal(_read_idx(path), array)


@pytest.mark.skipif(not FASHION.is_dir(), reason="Debian package dataset-fashion-mnist absent")
def test_fashion_mnist_from_the_debian_package():
    data = load_image_data("fashion-mnist")
    assert (len(data.train), len(data.test)) == (60000, 10000)
    assert data.shape == ImageShape(1, 28, 28, 10)
    assert np.bincount(data.train.labels.numpy()).tolist() == [6000] * 10
    # The published training statistics (the package README: mean 0.2860, std 0.3530).
    assert data.mean[0] == pytest.approx(0.2860, abs=1e-4)
    assert data.std[0] == pytest.approx(0.3530, abs=1e-4)


@pytest.mark.skipif(not JPEG_NPZ.is_file(), reason=f"{JPEG_NPZ} absent (../shared data)")
def test_cifar10_jpeg_copy_decodes_to_the_documented_pixels():
    train, test, classes, _ = _cifar10_jpeg(JPEG_NPZ)
    nhwc = test[0].permute(0, 2, 3, 1).contiguous().numpy()
    # sha256 of the decoded test split from ../shared/data/README.md.
    expected = "5a6aa8185204d80b65d3dfb540696dadd5f10d185ded226a96665d3e0fc6259f"
    assert hashlib.sha256(nhwc.tobytes()).hexdigest() == expected
    assert len(train[0]) == 50000 and classes[0] == "airplane"
    data = load_image_data("cifar10", JPEG_NPZ.parent, normalization="imagenet")
    assert data.mean == IMAGENET_MEAN and data.notes  # the lossy-copy note reaches the log


def test_registry_builds_every_own_model_for_gray_and_rgb():
    for name in ("resnet20", "resnet110", "cifar_resnet18", "small_cnn", "mlp"):
        for channels in (1, 3):
            model = build_model(name, ImageShape(channels, 16, 16, 7)).eval()
            x = torch.randn(2, channels, 16, 16)
            assert model(x).shape == (2, 7)
            split = split_model(model, example_input=x) if name != "mlp" else None
            if split is not None:
                with torch.no_grad():
                    torch.testing.assert_close(split(x), model(x))
    assert "resnet18" in model_names() and "mobilenet_v2" in model_names()
    with pytest.raises(ValueError, match="model 'nope' is unknown"):
        build_model("nope", ImageShape(3, 32, 32, 10))


def test_unknown_dataset_and_options():
    with pytest.raises(ValueError, match="unknown dataset 'svhn'"):
        load_image_data("svhn")
    with pytest.raises(ValueError, match="augment must be"):
        load_image_data("digits", augment="mixup")
    with pytest.raises(ValueError, match="needs RGB images"):
        load_image_data("digits", normalization="imagenet")


def test_imagenet_normalization_of_grayscale_repeated_to_rgb():
    """An RGB model takes grayscale images as 3 equal channels: ImageNet statistics apply."""
    data = load_image_data("digits", normalization="imagenet", rgb=True)
    assert (data.mean, data.std) == (IMAGENET_MEAN, IMAGENET_STD)
    x, _ = data.test[0]
    raw = load_image_data("digits").test.images[0].float() / 255.0  # (1, 8, 8) in [0, 1]
    mean, std = torch.tensor(IMAGENET_MEAN).view(3, 1, 1), torch.tensor(IMAGENET_STD).view(3, 1, 1)
    torch.testing.assert_close(x, (raw.expand(3, -1, -1) - mean) / std)
