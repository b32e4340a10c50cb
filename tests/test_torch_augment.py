"""The torch backend is the albumentations augmentation, not a look-alike: the same pixels for the
same draws, and draws with the same distribution."""

import numpy as np
import pytest
import torch
from scipy import stats

from onecycle.config import AugmentConfig
from onecycle.training import torch_augment as ta
from onecycle.training.augment import train_transform
from onecycle.training.batches import AlbumentationsStream, TensorStream, sample_images
from onecycle.training.runtime import select_device

MEAN, STD = (0.49, 0.48, 0.45), (0.25, 0.24, 0.26)
AUG = AugmentConfig(pad=4, flip=True, cutout=8, cutout_p=0.7)
CPU = select_device("cpu", 0)


def _images(n: int, size: int = 32, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, size, size, 3), dtype=np.uint8)


def _albumentations_with_draws(images: np.ndarray, aug: AugmentConfig, seed: int):
    """albumentations' outputs (normalized) and the draws it made, read from its own record."""
    transform = train_transform(aug, images.shape[1], MEAN, STD)
    transform.save_applied_params = True
    transform.set_random_seed(seed)
    outs, fields = [], {k: [] for k in ("crop_y", "crop_x", "flip", "hole_y", "hole_x", "hole")}
    for image in images:
        result = transform(image=image)
        applied = dict(result["applied_transforms"])
        x_min, y_min = (
            applied["RandomCrop"]["crop_coords"][:2] if "RandomCrop" in applied else (0, 0)
        )
        holes = applied.get("CoarseDropout", {}).get("holes")
        fields["crop_y"].append(y_min)
        fields["crop_x"].append(x_min)
        fields["flip"].append("HorizontalFlip" in applied)
        fields["hole"].append(holes is not None)
        fields["hole_x"].append(int(holes[0][0]) if holes is not None else 0)
        fields["hole_y"].append(int(holes[0][1]) if holes is not None else 0)
        outs.append(result["image"])
    draws = ta.Draws(**{k: torch.tensor(v) for k, v in fields.items()})
    return np.stack(outs), draws


@pytest.mark.parametrize(
    "aug",
    [
        AUG,
        AugmentConfig(pad=0, flip=True, cutout=0),
        AugmentConfig(pad=2, flip=False, cutout=5, cutout_p=1.0),
        AugmentConfig(pad=6, flip=True, cutout=12, cutout_p=0.5),
    ],
    ids=["recipe-ish", "flip-only", "pad2-cutout5", "pad6-cutout12"],
)
def test_same_draws_give_the_same_pixels_as_albumentations(aug):
    images = _images(200)
    expected, draws = _albumentations_with_draws(images, aug, seed=3)
    augmented = ta.apply(torch.from_numpy(images), draws, aug, ta.fill_pixel(MEAN))
    ours = ta.normalize(augmented, MEAN, STD).permute(0, 2, 3, 1).numpy()
    # the pixels are identical; the normalization's float rounding may differ in the last bits
    np.testing.assert_allclose(ours, expected, rtol=0, atol=2e-6)


def _chi2_uniform(values: np.ndarray, low: int, high: int) -> float:
    counts = np.bincount(values - low, minlength=high - low + 1)
    return stats.chisquare(counts).pvalue


def _support_and_p(values, low, high):
    values = np.asarray(values)
    return (int(values.min()), int(values.max())), _chi2_uniform(values, low, high)


@pytest.mark.parametrize("backend", ["albumentations", "torch"])
def test_draws_follow_the_same_distribution_in_both_backends(backend):
    n, size, aug = 4000, 32, AugmentConfig(pad=4, flip=True, cutout=8, cutout_p=1.0)
    if backend == "albumentations":
        _, d = _albumentations_with_draws(_images(n, seed=1), aug, seed=11)
    else:
        d = ta.draw(n, size, aug, seed=11)
    # crop offsets: exactly 0..2*pad (nine values), uniform; an off-by-one would miss 8 or hit 9
    for offsets in (d.crop_y, d.crop_x):
        support, p = _support_and_p(offsets.numpy(), 0, 2 * aug.pad)
        assert support == (0, 2 * aug.pad) and p > 1e-3
    # holes wholly inside the image: top-left 0..size-8, uniform
    for corner in (d.hole_y, d.hole_x):
        support, p = _support_and_p(corner.numpy(), 0, size - aug.cutout)
        assert support == (0, size - aug.cutout) and p > 1e-3
    assert stats.binomtest(int(d.flip.sum()), n, 0.5).pvalue > 1e-3
    assert bool(d.hole.all())


def test_cutout_probability_is_honoured():
    d = ta.draw(4000, 32, AugmentConfig(cutout=8, cutout_p=0.3), seed=0)
    assert stats.binomtest(int(d.hole.sum()), 4000, 0.3).pvalue > 1e-3


def test_a_batch_is_keyed_by_seed_epoch_and_batch():
    x = ta.pack(torch.from_numpy(_images(64)))
    a = ta.augment_batch(x, AUG, MEAN, STD, seed=0, epoch=1, batch=3)
    assert torch.equal(a, ta.augment_batch(x, AUG, MEAN, STD, seed=0, epoch=1, batch=3))
    assert not torch.equal(a, ta.augment_batch(x, AUG, MEAN, STD, seed=0, epoch=2, batch=3))
    assert a.shape == (64, 3, 32, 32) and a.is_contiguous(memory_format=torch.channels_last)


def test_both_streams_put_the_same_images_in_each_batch():
    x, y = _images(300), np.arange(300) % 10
    streams = [
        kind(x, y, 64, AUG, MEAN, STD, 5, CPU) for kind in (AlbumentationsStream, TensorStream)
    ]
    assert len(streams[0]) == len(streams[1]) == 4
    for (b1, _, y1), (b2, _, y2) in zip(
        streams[0].epoch(2, 1), streams[1].epoch(2, 1), strict=True
    ):
        assert b1 == b2 and torch.equal(y1, y2)


def test_data_parallel_ranks_split_each_batch_into_the_single_process_pixels():
    """Under DDP each rank takes a disjoint slice of every global batch, augmented exactly as one
    process augments those images: together the ranks train on the same batch."""
    from onecycle.training.distributed import Ranks

    x, y = _images(300), np.arange(300) % 10
    whole = TensorStream(x, y, 64, AUG, MEAN, STD, 5, CPU)
    parts = [TensorStream(x, y, 64, AUG, MEAN, STD, 5, CPU, Ranks(r, 2, r)) for r in (0, 1)]
    assert len(parts[0]) == len(whole) == 4  # the same steps an epoch: the global batch is 64
    for (b, xw, yw), (b0, x0, y0), (b1, x1, y1) in zip(
        whole.epoch(1), parts[0].epoch(1), parts[1].epoch(1), strict=True
    ):
        assert b == b0 == b1 and len(y0) == len(y1) == 32
        assert torch.equal(torch.cat([x0, x1]), xw) and torch.equal(torch.cat([y0, y1]), yw)


@pytest.mark.parametrize("backend", ["albumentations", "torch"])
def test_sample_images_show_the_backends_augmentation(backend):
    aug = AugmentConfig(backend=backend, pad=4, cutout=8, cutout_p=1.0)
    images, labels = sample_images(_images(100), np.arange(100) % 10, aug, MEAN, STD, seed=0)
    assert images.shape == (32, 32, 32, 3) and images.dtype == np.uint8 and len(labels) == 32
    fill = ta.fill_pixel(MEAN).numpy()
    holes = (np.abs(images.astype(int) - fill).max(-1) <= 1).sum((1, 2))  # rounding: +-1
    assert (holes >= 64).mean() > 0.9  # every image shows its 8x8 hole
