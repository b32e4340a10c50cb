"""The stage runner (onecycle/pipeline/runner.py): one-line user errors, params changed under a running stage,
and the temporary files that killed writes leave behind."""

import errno
import os
import shutil
import time

import pytest

from onecycle import files
from onecycle.errors import UserError, WriteError
from onecycle.pipeline import runner

from . import tiny_repo
from .conftest import ROOT


@pytest.fixture
def workspace(tmp_path, monkeypatch):
    """A folder with the project's dvc.yaml and committed params.yaml, as a stage's working
    directory."""
    shutil.copy(ROOT / "dvc.yaml", tmp_path / "dvc.yaml")
    (tmp_path / "params.yaml").write_text(tiny_repo.committed_params())
    monkeypatch.chdir(tmp_path)
    return tmp_path


def _exit_code(main, stage: str) -> int:
    with pytest.raises(SystemExit) as exit_:
        runner.run(main, stage)
    return exit_.value.code


def test_a_user_error_is_one_line_and_exit_1(workspace, capsys):
    def main():
        raise UserError("params.yaml: train.epochs must be >= 1")

    assert _exit_code(main, "train") == 1
    assert capsys.readouterr().err.strip() == "train: error: params.yaml: train.epochs must be >= 1"


def test_a_bug_keeps_its_traceback(workspace):
    def main():
        raise KeyError("a bug, not a user error")

    with pytest.raises(KeyError):
        runner.run(main, "train")


def _edit(path, old: str, new: str) -> None:
    text = path.read_text()
    assert old in text
    path.write_text(text.replace(old, new))


def test_params_changed_under_a_running_stage_fail_it_naming_the_key(workspace, capsys):
    # what a second `dvc exp run -S train.epochs=2` does to a 24-epoch train already running
    def main():
        _edit(workspace / "params.yaml", "epochs: 24", "epochs: 2")

    assert _exit_code(main, "train") == 1
    err = capsys.readouterr().err
    assert "params.yaml changed while the stage ran" in err
    assert (
        "\n  train.epochs: 24 -> 2\n" in err and "momentum" not in err
    )  # the key, not the section


def _lock_check_params(workspace) -> None:
    """dvc.lock as DVC leaves it once check_params checked the workspace's params.yaml."""
    import yaml

    from onecycle.params_file import read_yaml

    checked = read_yaml(workspace / "params.yaml")
    lock = {"schema": "2.0", "stages": {"check_params": {"params": {"params.yaml": checked}}}}
    (workspace / "dvc.lock").write_text(yaml.safe_dump(lock))


def test_params_changed_since_check_params_stop_a_stage_before_it_writes_anything(
    workspace, capsys, monkeypatch
):
    """A second `dvc exp run -S train.epochs=2`, refused by DVC's lock, still rewrote params.yaml
    under the pipeline run already going (checked at 24 epochs): its train refuses to start,
    naming the key, instead of training 2 epochs that DVC would lock (issue 26, item 2)."""
    _lock_check_params(workspace)
    _edit(workspace / "params.yaml", "epochs: 24", "epochs: 2")
    _edit(workspace / "params.yaml", "dpi: 120", "dpi: 150")
    ran = []
    monkeypatch.setenv("DVC_STAGE", "train")  # as DVC runs it

    assert _exit_code(lambda: ran.append(1), "train") == 1
    err = capsys.readouterr().err
    assert not ran, "the stage ran"
    assert "is not what check_params checked when this pipeline run started" in err
    assert "\n  plots.dpi: 120 -> 150\n  train.epochs: 24 -> 2\n" in err
    lines = err.strip().splitlines()
    assert len(lines) == 5, err  # the keys, not the file; then how to restore what DVC removed
    assert lines[-1].startswith(
        "DVC removed train's outputs before running it: `dvc checkout train`"
    )

    _lock_check_params(workspace)  # check_params ran again on today's params: accepted
    runner.run(lambda: ran.append(1), "train")
    monkeypatch.delenv("DVC_STAGE")  # by hand, nothing to compare with: not the runner's business
    _edit(workspace / "params.yaml", "epochs: 2", "epochs: 3")
    runner.run(lambda: ran.append(1), "train")
    assert ran == [1, 1]


def test_a_change_to_params_the_stage_does_not_read_is_not_its_business(workspace):
    def main():
        _edit(workspace / "params.yaml", "dpi: 120", "dpi: 150")  # plots.dpi: not train's

    runner.run(main, "train")  # returns normally


def test_check_params_watches_the_whole_file(workspace):
    def main():
        (workspace / "params.yaml").write_text(
            (workspace / "params.yaml").read_text() + "\ntrian:\n  x: 1\n"
        )

    assert _exit_code(main, "check_params") == 1


def test_stale_temporary_files_of_killed_writes_are_removed_at_the_start(workspace):
    models = workspace / "models"
    models.mkdir()
    stale = models / ".model.pt.4qvtmp7a.tmp"
    stale.write_bytes(b"half a checkpoint")
    old = time.time() - 3600
    os.utime(stale, (old, old))
    fresh = models / ".model.pt.inflight.tmp"  # another process may be writing it right now
    fresh.write_bytes(b"being written")
    keep = models / "model.pt"
    keep.write_bytes(b"weights")

    runner.run(lambda: None, "train")
    assert not stale.exists() and fresh.exists() and keep.exists()


def test_atomic_writes_get_the_umask_mode_and_leave_nothing_behind(tmp_path):
    previous = os.umask(0o022)
    try:
        files.write_json(tmp_path / "metrics" / "m.json", {"a": 1})
    finally:
        os.umask(previous)
    assert (tmp_path / "metrics" / "m.json").stat().st_mode & 0o777 == 0o644  # not mkstemp's 0600
    assert [p.name for p in (tmp_path / "metrics").iterdir()] == ["m.json"]


def test_a_failed_write_keeps_the_old_file_and_no_temporary(tmp_path):
    path = tmp_path / "m.json"
    files.write_json(path, {"old": True})

    def broken(f):
        f.write(b"{half")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        files.atomic_write(path, broken)
    assert path.read_text().strip() == '{\n  "old": true\n}'
    assert [p.name for p in tmp_path.iterdir()] == ["m.json"]


@pytest.mark.parametrize(
    "name", ["models/.model.pt.4qvtmp7a.tmp", "metrics/.eval.json.ab12cd34.tmp"]
)
def test_temporary_names_are_ignored_by_git(name):
    import subprocess

    assert subprocess.run(["git", "check-ignore", "-q", name], cwd=ROOT).returncode == 0


def test_check_params_refuses_while_another_pipeline_holds_this_workspace(workspace):
    """A second `dvc exp run -S ...` beside a running one: its check_params sees the first's
    locks in DVC's rwlock and stops before DVC records its check (issue 26, item 2); locks of
    its own dvc process and of processes that are gone are not in the way."""
    import json
    import subprocess
    import sys

    from stages import check_params

    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                              capture_output=True, text=True).stdout.strip()  # fmt: skip
        rwlock = workspace / ".dvc" / "tmp" / "rwlock"
        rwlock.parent.mkdir(parents=True)
        mine = {"pid": os.getppid(), "cmd": "dvc repro"}  # as if it ran this one
        locks = {
            "write": {"runs/params_checked.txt": mine},
            "read": {"data/prepared": [{"pid": int(dead), "cmd": "dvc repro (killed)"}]},
        }
        rwlock.write_text(json.dumps(locks))
        check_params.main()  # its own and a dead one's: accepted
        locks["read"]["data/prepared"].append({"pid": other.pid, "cmd": "dvc exp run -S x=1"})
        rwlock.write_text(json.dumps(locks))
        with pytest.raises(UserError, match=rf"another pipeline run is going on in this "
                           rf"workspace \(PID {other.pid}: dvc exp run -S x=1\)"):  # fmt: skip
            check_params.main()
    finally:
        other.kill()
        other.wait()


def _torch_on_a_full_disk(f):
    """What torch.save does on a full disk: its writer's RuntimeError, the OSError inside."""
    f.write(b"half a checkpoint")
    try:
        raise OSError(errno.ENOSPC, "No space left on device")
    except OSError:
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 704 vs 598")  # noqa: B904 - as torch does


def _read_only(f):
    raise OSError(errno.EROFS, "Read-only file system")


@pytest.mark.parametrize(
    "write, cause",
    [
        (_torch_on_a_full_disk, "no space left on its file system ("),
        (_read_only, "cannot be written (read-only file system)"),
    ],
)
def test_an_output_that_cannot_be_written_is_one_line_and_the_old_one_stays(tmp_path, write, cause):
    """A checkpoint saved on a full disk ended in torch's traceback (`unexpected pos … vs …`,
    inline_container.cc); one line now names the file, the cause and what to do, and the
    previous file stays as it was (issue 26, item 4)."""
    path = tmp_path / "model.pt"
    files.write_text(path, "the previous weights")
    with pytest.raises(WriteError) as err:
        files.atomic_write(path, write)
    text = str(err.value)
    assert text.startswith(f"{path}: {cause}") and "the previous model.pt is unchanged" in text
    assert len(text.splitlines()) == 1
    assert path.read_text() == "the previous weights"
    assert [p.name for p in tmp_path.iterdir()] == ["model.pt"]
