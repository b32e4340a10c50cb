"""Shared fixtures: real CIFAR-10 (the shared archive) shrunk to a few hundred images, and a tiny
config (narrow model, a couple of epochs, CPU) so every stage runs in seconds."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from onecycle import prepared, sources
from onecycle.config import DataConfig, parse_params

ROOT = Path(__file__).resolve().parents[1]
# The shared image-folder copy beside the repo; ONECYCLE_TEST_DATA points elsewhere (any source
# `data.source` accepts, e.g. the official archive on a hosted CI runner).
SHARED_CIFAR = Path(
    os.environ.get("ONECYCLE_TEST_DATA", ROOT / ".." / "shared" / "datasets" / "cifar10-jpg.tar.gz")
).resolve()


@pytest.fixture(scope="session")
def shared_cifar() -> Path:
    if not SHARED_CIFAR.exists():
        pytest.fail(
            f"{SHARED_CIFAR} is missing: the tests need real CIFAR-10, by default the shared "
            "copy beside the repo; set ONECYCLE_TEST_DATA to another copy"
        )
    return SHARED_CIFAR


@pytest.fixture(scope="session")
def tiny_data(shared_cifar, tmp_path_factory):
    """A stratified 640-train / 200-test slice of real CIFAR-10 (only those images decoded),
    saved and loaded like the download stage does."""
    cfg = DataConfig(source=str(shared_cifar), train_subset=640, test_subset=200)
    ds, _ = sources.fetch(cfg, ROOT, ROOT / "data" / "raw", seed=0)
    out = tmp_path_factory.mktemp("prepared") / "prepared"
    prepared.save_prepared(ds, out, "test slice of cifar10-jpg")
    return prepared.load_prepared(out)


TINY = {
    "base": {"seed": 0, "device": "cpu", "num_workers": 0},
    "model": {"width": 4},
    "lr_find": {"num_iter": 30, "start_lr": 1e-3, "end_lr": 10.0},
    "train": {"epochs": 2, "batch_size": 64, "eval_every": 1, "max_lr": 0.2},
}


@pytest.fixture
def tiny_params():
    return parse_params(TINY)
