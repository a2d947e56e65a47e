"""bwrf_ext.data and the model registry: formats, splits, augmentation, normalisation."""

from __future__ import annotations

import gzip
import hashlib
from pathlib import Path

import numpy as np
import pytest
import torch

from bwrf_ext.data import InMemoryImages, _cifar10_jpeg, _read_idx, load_image_data
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
