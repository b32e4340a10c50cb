"""Shared fixtures: real CIFAR-10 (the shared archive) shrunk to a few hundred images, a tiny
config (narrow model, a couple of epochs, CPU) so every stage runs in seconds, and the one tiny
pipeline run the suite shares (``pipeline``, read-only) with copies of it to change (``fork``)."""

from __future__ import annotations

import os
import sys
from pathlib import Path

# One thread per process: the tiny models gain nothing from a second, and the suite runs its
# in-process tests beside the shared run's build (measured: the in-process tests take as long).
os.environ.setdefault("OMP_NUM_THREADS", "1")

import pytest  # noqa: E402

from onecycle.config import DataConfig, parse_params  # noqa: E402
from onecycle.data import (
    prepared,  # noqa: E402
    sources,
)

from . import tiny_repo  # noqa: E402

# The shared image-folder copy beside the repo; ONECYCLE_TEST_DATA points elsewhere (any source
# `data.source` accepts, e.g. the official archive on a hosted CI runner).
ROOT, SHARED_CIFAR = tiny_repo.ROOT, tiny_repo.SHARED_CIFAR
# The environment's commands (dvc, mlflow) for the tests that call them, also when pytest was
# started by its path rather than from an activated environment or `make test`.
os.environ["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"


@pytest.fixture(scope="session")
def shared_cifar() -> Path:
    if not SHARED_CIFAR.exists():
        pytest.fail(
            f"{SHARED_CIFAR} is missing: the tests need real CIFAR-10, by default the shared "
            "copy beside the repo; set ONECYCLE_TEST_DATA to another copy"
        )
    return SHARED_CIFAR


@pytest.fixture(scope="session")
def tiny_data(shared_cifar, pytestconfig):
    """A stratified 640-train / 200-test slice of real CIFAR-10 (only those images decoded),
    saved and loaded like the download stage does. Made once per test run: the first xdist
    worker to ask reads the archive (5 s of CPU), the others wait on its lock and load it."""
    import fcntl

    out = _run_dir(pytestconfig) / "tiny-data" / "prepared"
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out.parent / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not out.exists():
            cfg = DataConfig(source=str(shared_cifar), train_subset=640, test_subset=200)
            ds, _ = sources.fetch(cfg, ROOT, ROOT / "data" / "raw", seed=0)
            prepared.save_prepared(ds, out.with_name("partial"), "test slice of cifar10-jpg")
            out.with_name("partial").rename(out)
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


# ---------------------------------------------------------------- the shared tiny pipeline run


def _run_dir(config: pytest.Config) -> Path:
    """One folder for the whole test run, xdist workers included."""
    base = config._tmp_path_factory.getbasetemp()  # the tmp_path_factory fixture's own
    return base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base


def _tiny_dest(config: pytest.Config) -> Path:
    """Where the shared run is built."""
    return _run_dir(config) / "tiny" / "repo"


def _whole_suite(config: pytest.Config) -> bool:
    """`make test` or CI: every test under testpaths, none deselected by -k or -m."""
    return (
        config.args_source == pytest.Config.ArgsSource.TESTPATHS
        and not config.option.keyword
        and not config.option.markexpr
    )


@pytest.hookimpl(trylast=True)  # after the tmp_path plugin set up its factory
def pytest_configure(config):
    """The whole suite needs the shared run: start building it now, before the ~10 s that
    collecting (importing torch, MLflow, DVC in every xdist worker) takes. A selection waits for
    collection to say whether it needs the run (:func:`pytest_collection_modifyitems`)."""
    if not os.environ.get("PYTEST_XDIST_WORKER") and _whole_suite(config):
        tiny_repo.start_build(_tiny_dest(config))


def _needs_the_run(item) -> bool:
    return bool({"pipeline", "fork"} & set(item.fixturenames))


# Started first, on a worker of its own under xdist: the study's queue mostly waits on DVC (83 s,
# of which 37 s of CPU), so it waits beside the CPU-bound tests instead of after them. Measured
# on the 2-core Intel Xeon, `make test`: 255 s when it ran last, after the two-process test on
# the same worker, the other two workers idle for its last minute.
FIRST = ("tests/test_study_queue.py",)


def _order(item, sizes: dict[str, int]) -> tuple:
    """The order `make test` hands modules to xdist's workers (``--no-loadscope-reorder``):
    FIRST, the in-process modules (the largest first, as xdist's own reordering would), then
    those that need the shared run, the long ones first."""
    module = item.nodeid.split("::")[0]
    if module in FIRST:
        return (0, FIRST.index(module))
    if not _needs_the_run(item):
        return (1, -sizes[module], module)
    return (2, item.get_closest_marker("long") is None)


# Under `make test` (--dist loadscope) xdist hands each worker whole scopes. A module is one
# scope only where its tests share a module fixture built once (a server); every other test is a
# scope of its own, so the last minute is not one worker running test_pipeline.py's tests in a
# row while the others idle. (xdist's own --dist loadgroup would say this with marks, but with
# pytest 9.2 it silently stops grouping: pytest-dev/pytest-xdist#1386.)
ONE_WORKER = ("tests/test_scaleout.py", "tests/test_ui.py")


def pytest_xdist_make_scheduler(config, log):
    if config.getvalue("dist") != "loadscope":
        return None
    from xdist.scheduler import LoadScopeScheduling

    class TestOrSharedModule(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            module = nodeid.split("::")[0]
            return module if module in ONE_WORKER else nodeid

    return TestOrSharedModule(config, log)


@pytest.hookimpl(trylast=True)  # after -m and -k deselected what they deselect
def pytest_collection_modifyitems(session, config, items):
    """Start building the shared run at once when a selected test needs it, and order the tests
    (:func:`_order`): the in-process tests run while it builds, the long modules start as soon
    as it is built."""
    if any(map(_needs_the_run, items)):
        tiny_repo.start_build(_tiny_dest(config))
        if _shuffled(config):  # `make test-shuffled`: its order, but the shared run's tests last
            items.sort(key=lambda item: _needs_the_run(item))
            return
        sizes: dict[str, int] = {}
        for item in items:
            module = item.nodeid.split("::")[0]
            sizes[module] = sizes.get(module, 0) + 1
        items.sort(key=lambda item: _order(item, sizes))


def _shuffled(config: pytest.Config) -> bool:
    try:
        from random_order.config import Config
    except ImportError:
        return False
    return Config(config).is_enabled


def pytest_unconfigure(config):
    if not os.environ.get("PYTEST_XDIST_WORKER") and hasattr(config, "_tmp_path_factory"):
        tiny_repo.stop_build(_tiny_dest(config))


@pytest.fixture(scope="session")
def pipeline(request) -> Path:
    """The tiny pipeline after `dvc repro` (committed): look, never change (use ``fork``)."""
    return tiny_repo.wait_for_build(_tiny_dest(request.config))


@pytest.fixture
def fork(pipeline, tmp_path) -> Path:
    """A copy of the finished tiny pipeline for a test that changes it."""
    return tiny_repo.fork(pipeline, tmp_path / "repo")
