"""onecycle.config: params.yaml is checked before any work, with the bad key named."""

from __future__ import annotations

import io
import math
import tarfile
import zipfile
from pathlib import Path

import pytest
import yaml
from pydantic import ValidationError

from onecycle import paths
from onecycle.config import ConfigError, Params, load_params, parse_params
from onecycle.params_file import repo_root, resolve_path

REPO = Path(__file__).resolve().parents[1]


def error(raw) -> str:
    with pytest.raises(ConfigError) as err:
        parse_params(raw)
    return str(err.value)


# ---------------------------------------------------------------- the real file


def test_repo_params_yaml_loads_with_its_values():
    params = load_params(REPO / "params.yaml")
    assert isinstance(params, Params)
    raw = yaml.safe_load((REPO / "params.yaml").read_text())
    dumped = params.model_dump()
    for section, values in raw.items():
        for key, value in values.items():
            assert dumped[section][key] == value, f"{section}.{key}"


def test_repo_params_yaml_lists_every_key_so_exp_run_can_set_it():
    # `dvc exp run -S train.base_lr=0.01` is refused by DVC when the key is not in the file
    def keys(tree, prefix=""):
        for k, v in tree.items():
            if isinstance(v, dict):
                yield from keys(v, f"{prefix}{k}.")
            else:
                yield f"{prefix}{k}"

    raw = yaml.safe_load((REPO / "params.yaml").read_text())
    missing = set(keys(parse_params({}).model_dump())) - set(keys(raw))
    assert not missing, f"params.yaml lacks {sorted(missing)}"


def test_params_are_frozen():
    params = parse_params({})
    with pytest.raises(ValidationError):
        params.train.epochs = 3


@pytest.mark.parametrize("raw", [None, {}])
def test_empty_params_give_the_defaults(raw):
    params = parse_params(raw)
    assert params == Params()
    assert params.data.source == "cifar10" and params.train.max_lr == "auto"


# ---------------------------------------------------------------- unknown keys


def test_unknown_key_is_named_with_a_suggestion():
    # the typo case: dvc exp run -S train.max_lrr=0.1
    msg = error({"train": {"max_lrr": 0.1}})
    assert "train.max_lrr: unknown key" in msg
    assert "'max_lr'" in msg


@pytest.mark.parametrize(
    ("key", "new"),
    [
        ("train.step_size", "renamed train.step_epochs"),
        ("train.gamma", "renamed train.step_gamma"),
        ("lr_find.smooth_beta", "lr_find.smooth_window"),
    ],
)
def test_a_key_of_an_older_params_yaml_names_what_took_its_place(key, new):
    section, name = key.split(".")
    msg = error({section: {name: 2}})
    assert f"{key}: no longer a key: " in msg and new in msg and "typo" not in msg


def test_unknown_section_is_named():
    msg = error({"trian": {"epochs": 3}})
    assert "trian: unknown key" in msg and "'train'" in msg


def test_unknown_nested_key_is_named():
    assert "train.augment.flp: unknown key" in error({"train": {"augment": {"flp": True}}})


def test_unknown_key_that_looks_like_a_type_name_is_still_named():
    # The old message dropped every key part starting with "int"/"float"/"literal[".
    msg = error({"train": {"interval": 3}})
    assert "train.interval: unknown key" in msg


def test_every_bad_key_is_reported_at_once():
    msg = error({"train": {"epochs": "ten", "max_lrr": 1.0}, "lr_find": {"mode": "cubic"}})
    assert "train.epochs" in msg and "train.max_lrr" in msg and "lr_find.mode" in msg


def test_not_a_mapping():
    assert "expected a mapping of sections, got list" in error([1, 2])


# ---------------------------------------------------------------- types


@pytest.mark.parametrize(
    "raw, key, shown",
    [
        ({"train": {"epochs": "ten"}}, "train.epochs", "'ten'"),
        ({"train": {"epochs": 2.5}}, "train.epochs", "2.5"),
        ({"train": {"epochs": True}}, "train.epochs", "True"),
        ({"train": {"nesterov": 3}}, "train.nesterov", "3"),
        ({"train": {"nesterov": "yes"}}, "train.nesterov", "'yes'"),
        ({"base": {"seed": "0"}}, "base.seed", "'0'"),
        ({"data": {"train_subset": "all"}}, "data.train_subset", "'all'"),
        ({"train": {"augment": {"pad": 1.5}}}, "train.augment.pad", "1.5"),
        ({"train": 5}, "train", "5"),
    ],
)
def test_wrong_type_names_the_key_and_the_value(raw, key, shown):
    msg = error(raw)
    assert f"  {key}: " in msg
    assert f"(got {shown})" in msg


# ---------------------------------------------------------------- ranges and choices


@pytest.mark.parametrize("value", [0, -1, 0.0, -0.5, math.inf, math.nan])
def test_max_lr_must_be_positive_and_finite(value):
    msg = error({"train": {"max_lr": value}})
    assert "  train.max_lr: must be 'auto' or a finite number > 0" in msg


def test_max_lr_that_is_neither_auto_nor_a_number():
    msg = error({"train": {"max_lr": "fast"}})
    assert msg.count("train.max_lr") == 1  # one line for the key, both choices on it
    assert "'auto'" in msg and "valid number" in msg


@pytest.mark.parametrize("value, expected", [("auto", "auto"), (0.4, 0.4), (1, 1.0)])
def test_max_lr_accepts_auto_and_numbers(value, expected):
    got = parse_params({"train": {"max_lr": value}}).train.max_lr
    assert got == expected and type(got) is type(expected)


@pytest.mark.parametrize(
    "lr_find",
    [
        {"start_lr": 1.0, "end_lr": 0.5},
        {"start_lr": 0.5, "end_lr": 0.5},
        {"start_lr": 20.0},  # above the default end_lr (10)
    ],
)
def test_lr_find_end_lr_must_exceed_start_lr(lr_find):
    msg = error({"lr_find": lr_find})
    assert "  lr_find.end_lr: must be greater than lr_find.start_lr" in msg


@pytest.mark.parametrize(
    "raw, key",
    [
        ({"lr_find": {"start_lr": 0}}, "lr_find.start_lr"),
        ({"lr_find": {"num_iter": 1}}, "lr_find.num_iter"),
        ({"lr_find": {"momentum": 1.0}}, "lr_find.momentum"),
        ({"train": {"epochs": 0}}, "train.epochs"),
        ({"train": {"pct_start": 1.0}}, "train.pct_start"),
        ({"train": {"augment": {"cutout_p": 1.5}}}, "train.augment.cutout_p"),
        ({"data": {"image_size": 4}}, "data.image_size"),
        ({"data": {"train_subset": 0}}, "data.train_subset"),
        ({"data": {"timeout": 0}}, "data.timeout"),
        ({"base": {"num_workers": -1}}, "base.num_workers"),
        ({"train": {"base_momentum": 0.9, "max_momentum": 0.8}}, "train.max_momentum"),
        ({"train": {"max_momentum": 0.0, "base_momentum": 0.0}}, "train.nesterov"),
    ],
)
def test_out_of_range_names_the_key(raw, key):
    assert f"  {key}: " in error(raw)


@pytest.mark.parametrize(
    "section, key, value, allowed",
    [
        ("lr_find", "mode", "cubic", ["'exp'", "'linear'"]),
        ("lr_find", "suggestion", "best", ["'valley'", "'steepest'", "'min_div10'"]),
        ("train", "schedule", "cosine", ["'onecycle'", "'constant'", "'step'"]),
        ("train", "anneal_strategy", "cosine", ["'linear'", "'cos'"]),
        ("base", "device", "gpu", ["'auto'", "'cuda'", "'mps'", "'cpu'"]),
    ],
)
def test_choices_name_the_allowed_values(section, key, value, allowed):
    msg = error({section: {key: value}})
    assert f"  {section}.{key}: " in msg and f"(got {value!r})" in msg
    for choice in allowed:
        assert choice in msg


def test_valid_overrides_are_kept():
    params = parse_params(
        {
            "base": {"num_workers": 0, "device": "cpu"},
            "data": {"train_subset": None, "source": "data/set.zip"},
            "lr_find": {"mode": "linear", "start_lr": 0.001, "end_lr": 0.065},
            "train": {"nesterov": False, "max_momentum": 0.0, "base_momentum": 0.0},
        }
    )
    assert params.base.num_workers == 0 and params.data.train_subset is None
    assert params.lr_find.mode == "linear" and params.train.nesterov is False


# ---------------------------------------------------------------- load_params


def test_load_params_reads_exponents_without_a_dot(tmp_path):
    # `dvc exp run -S lr_find.start_lr=1e-5` writes `start_lr: 1e-05`; PyYAML's YAML 1.1
    # rules would make that the string '1e-05' and the stage would refuse it.
    path = tmp_path / "params.yaml"
    path.write_text("lr_find:\n  start_lr: 1e-05\n  end_lr: 1E+1\ntrain:\n  weight_decay: 5e-4\n")
    params = load_params(path)
    assert params.lr_find.start_lr == 1e-05 and params.lr_find.end_lr == 10.0
    assert params.train.weight_decay == 5e-4


def test_load_params_names_the_file_and_the_key(tmp_path):
    path = tmp_path / "params.yaml"
    path.write_text("train:\n  max_lrr: 0.1\n")
    with pytest.raises(ConfigError) as err:
        load_params(path)
    assert str(err.value).startswith(f"{path} is invalid:")
    assert "train.max_lrr" in str(err.value)


def test_load_params_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="not found: run from the repository root"):
        load_params(tmp_path / "params.yaml")


def test_load_params_invalid_yaml(tmp_path):
    path = tmp_path / "params.yaml"
    path.write_text("train: [unclosed\n")
    with pytest.raises(ConfigError, match="is not valid YAML"):
        load_params(path)


def test_load_params_reads_the_working_directory(tmp_path, monkeypatch):
    (tmp_path / "params.yaml").write_text("train:\n  epochs: 7\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("DVC_ROOT", str(REPO))  # a queued experiment: DVC_ROOT is elsewhere
    assert load_params().train.epochs == 7


# ---------------------------------------------------------------- paths


def test_resolve_path_uses_dvc_root(tmp_path, monkeypatch):
    monkeypatch.setenv("DVC_ROOT", str(tmp_path))
    monkeypatch.chdir(REPO)
    assert repo_root() == tmp_path.resolve()
    assert resolve_path("data/raw") == tmp_path.resolve() / "data/raw"
    assert resolve_path(Path("../shared/x.tar.gz")) == tmp_path.resolve() / "../shared/x.tar.gz"


def test_resolve_path_keeps_absolute_paths(tmp_path, monkeypatch):
    monkeypatch.setenv("DVC_ROOT", str(tmp_path / "root"))
    absolute = tmp_path / "elsewhere" / "set.zip"
    assert resolve_path(absolute) == absolute
    assert resolve_path(str(absolute)) == absolute


def test_resolve_path_expands_home(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    assert resolve_path("~/set.zip") == tmp_path / "set.zip"


def test_resolve_path_with_an_explicit_root(tmp_path, monkeypatch):
    monkeypatch.setenv("DVC_ROOT", str(REPO))
    assert resolve_path("a/b", root=tmp_path) == tmp_path / "a/b"


def test_repo_root_without_dvc_root_finds_dvc_yaml(tmp_path, monkeypatch):
    monkeypatch.delenv("DVC_ROOT", raising=False)
    (tmp_path / "dvc.yaml").write_text("stages: {}\n")
    (tmp_path / "sub" / "deeper").mkdir(parents=True)
    monkeypatch.chdir(tmp_path / "sub" / "deeper")
    assert repo_root() == tmp_path.resolve()
    assert resolve_path("data") == tmp_path.resolve() / "data"


@pytest.mark.parametrize(
    ("raw", "names"),
    [
        (
            {"base": {"devices": 3}, "train": {"batch_size": 512}},
            ["train.batch_size", "base.devices"],
        ),
        (
            {"base": {"devices": 2}, "train": {"augment": {"backend": "albumentations"}}},
            ["train.augment.backend"],
        ),
    ],
)
def test_data_parallel_settings_that_cannot_work_name_the_key(raw, names):
    from onecycle.training import distributed

    with pytest.raises(ConfigError) as err:
        distributed.check(parse_params(raw))
    assert all(n in str(err.value) for n in names), err.value


def test_more_ranks_than_cpu_cores_are_refused_naming_the_key(monkeypatch):
    from onecycle.training import distributed

    monkeypatch.setattr(distributed.torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(distributed.os, "sched_getaffinity", lambda pid: {0, 1}, raising=False)
    params = parse_params({"base": {"devices": 64}, "train": {"batch_size": 512}})
    with pytest.raises(ConfigError) as err:
        distributed.check(params)
    assert str(err.value) == (
        "params.yaml: base.devices=64 ranks on the CPU, but this machine gives this process 2 "
        "core(s): set base.devices to 2 or less"
    )
    distributed.check(parse_params({"base": {"devices": 2}, "train": {"batch_size": 512}}))


def test_check_params_refuses_what_the_ranks_would_refuse_before_any_stage_runs(
    tmp_path, monkeypatch
):
    """DVC removes a stage's outputs before running it: a batch that does not split over the
    devices must stop check_params, not train after lr_find's outputs are gone."""
    from stages import check_params

    monkeypatch.chdir(tmp_path)
    (tmp_path / "params.yaml").write_text("base:\n  devices: 2\ntrain:\n  batch_size: 63\n")
    with pytest.raises(
        ConfigError, match=r"train.batch_size=63 must split evenly over base.devices=2"
    ):
        check_params.main()
    assert not (tmp_path / paths.PARAMS_CHECKED).exists()


def test_zero_devices_is_refused():
    assert "base.devices" in error({"base": {"devices": 0}})


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (
            {"source": "cifar10", "train_subset": 5},
            "params.yaml: data.train_subset=5 is smaller than the 10 classes of data.source; "
            "raise it or set null",
        ),
        (
            {"source": "folder", "test_subset": 2},
            "params.yaml: data.test_subset=2 is smaller than the 3 classes of data.source; "
            "raise it or set null",
        ),
        (
            {"source": "set.tar.gz", "train_subset": 2},  # its tar headers: 3 class folders
            "params.yaml: data.train_subset=2 is smaller than the 3 classes of data.source; "
            "raise it or set null",
        ),
        (
            {"source": "set.zip", "test_subset": 1},
            "params.yaml: data.test_subset=1 is smaller than the 3 classes of data.source; "
            "raise it or set null",
        ),
        (
            {"source": "cifar10", "train_subset": 100, "val_images": 60},
            "params.yaml: data.val_images=60 would leave 40 of data.train_subset=100 images to "
            "train on; keep it at most half (50), or raise data.train_subset",
        ),
    ],
)
def test_check_params_refuses_subsets_that_download_would_refuse(
    tmp_path, monkeypatch, data, message
):
    """A subset smaller than the classes (or a validation split over half of it) stops
    check_params, before DVC removes data/prepared (issue 26, item 1)."""
    from onecycle.errors import DataError
    from stages import check_params

    for cls in ("a", "b", "c", ".hidden"):
        (tmp_path / "folder" / "train" / cls).mkdir(parents=True)
    names = [f"{split}/{c}/1.png" for split in ("train", "test") for c in "abc"] + ["README"]
    with (
        tarfile.open(tmp_path / "set.tar.gz", "w:gz") as tar,
        zipfile.ZipFile(tmp_path / "set.zip", "w") as zf,
    ):
        for name in names:
            info = tarfile.TarInfo(name)
            info.size = 4
            tar.addfile(info, io.BytesIO(b"fake"))
            zf.writestr(name, b"fake")
    monkeypatch.chdir(tmp_path)
    (tmp_path / "params.yaml").write_text(yaml.safe_dump({"data": data}))
    with pytest.raises(DataError) as err:
        check_params.main()
    assert str(err.value) == message
    assert not (tmp_path / paths.PARAMS_CHECKED).exists()
    (tmp_path / "params.yaml").write_text(
        yaml.safe_dump({"data": {**data, "train_subset": 30, "test_subset": 30, "val_images": 10}})
    )
    check_params.main()  # 30 images of 10 classes, 10 held out: accepted


def test_the_class_count_of_an_archive_comes_from_data_prepared_made_from_it(tmp_path):
    """No header walk when data/prepared's meta.json names the same file and is newer; a
    changed archive is walked again."""
    import json
    import os

    from onecycle.data import archives
    from onecycle.pipeline import precheck

    archive = tmp_path / "set.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        for name in ("train/a/1.png", "train/b/1.png", "test/a/1.png", "test/b/1.png"):
            info = tarfile.TarInfo(name)
            info.size = 4
            tar.addfile(info, io.BytesIO(b"fake"))
    meta = tmp_path / paths.PREPARED_DIR / "meta.json"
    meta.parent.mkdir(parents=True)
    meta.write_text(json.dumps({"source": f"{archive} (md5 0)", "classes": list("abcde")}))
    cfg = parse_params({"data": {"source": str(archive)}}).data
    assert precheck.known_class_count(cfg, tmp_path) == 5  # meta.json's, not the headers' 2
    os.utime(archive, (meta.stat().st_mtime + 10,) * 2)  # the archive changed since
    assert precheck.known_class_count(cfg, tmp_path) == archives.class_count(archive) == 2


def test_check_params_refuses_a_local_source_that_does_not_exist(tmp_path, monkeypatch):
    """Download would refuse it after DVC removed data/prepared."""
    from onecycle.errors import DataError
    from stages import check_params

    monkeypatch.chdir(tmp_path)
    (tmp_path / "params.yaml").write_text(yaml.safe_dump({"data": {"source": "gone.tar.gz"}}))
    with pytest.raises(DataError) as err:
        check_params.main()
    assert str(err.value).startswith(f"data.source: {tmp_path / 'gone.tar.gz'} does not exist; ")
    assert not (tmp_path / paths.PARAMS_CHECKED).exists()


@pytest.mark.parametrize(
    "content, reason",
    [
        (None, "not found"),
        (b"not weights\n", "is not a loadable weights-only file"),
        ("nan", "holds weights that are NaN or infinite"),
    ],
)
def test_check_params_refuses_a_weights_file_that_lr_find_would_refuse(
    tmp_path, monkeypatch, content, reason
):
    """model.pretrained naming a missing file, or one that is not a weights file, stops
    check_params, before DVC removes lr_find's outputs (which have no cache to restore them
    from; issue 26, item 1). A weights file that loads passes."""
    import torch

    from onecycle.errors import UserError
    from stages import check_params

    weights = tmp_path / "w.pt"
    if content == "nan":
        torch.save({"fc.weight": torch.full((2, 2), float("nan"))}, weights)
    elif content is not None:
        weights.write_bytes(content)
    monkeypatch.chdir(tmp_path)
    (tmp_path / "params.yaml").write_text(yaml.safe_dump({"model": {"pretrained": str(weights)}}))
    with pytest.raises(UserError) as err:
        check_params.main()
    assert str(err.value).startswith(f"model.pretrained: {weights}") and reason in str(err.value)
    assert not (tmp_path / paths.PARAMS_CHECKED).exists()
    torch.save({"fc.weight": torch.zeros(2, 2)}, weights)
    check_params.main()
    assert (tmp_path / paths.PARAMS_CHECKED).exists()
