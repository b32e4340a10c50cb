"""End to end through DVC on real CIFAR-10 (tiny settings): what a user sees after `dvc repro`."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from onecycle import paths

from .conftest import ROOT, SHARED_CIFAR

pytestmark = pytest.mark.slow

TINY_PIPELINE = {
    "base": {"device": "cpu"},
    "data": {"source": str(SHARED_CIFAR), "train_subset": 1000, "test_subset": 500},
    "model": {"width": 4},
    "lr_find": {"num_iter": 40, "start_lr": 1e-3},
    "train": {"epochs": 2, "batch_size": 64},
}


def _copy_repo(dest: Path) -> Path:
    """The working tree as git sees it (tracked + untracked-not-ignored), committed in a new repo."""
    files = (
        subprocess.run(
            ["git", "ls-files", "-co", "--exclude-standard", "-z"],
            cwd=ROOT,
            capture_output=True,
            check=True,
        )
        .stdout.decode()
        .split("\0")
    )
    for rel in filter(None, files):
        src = ROOT / rel
        if src.is_file():
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / rel)
    env = {
        **os.environ,
        "GIT_AUTHOR_NAME": "t",
        "GIT_AUTHOR_EMAIL": "t@t",
        "GIT_COMMITTER_NAME": "t",
        "GIT_COMMITTER_EMAIL": "t@t",
    }
    for cmd in (["git", "init", "-q"], ["git", "add", "-A"], ["git", "commit", "-qm", "copy"]):
        subprocess.run(cmd, cwd=dest, check=True, env=env)
    return dest


def _set_params(repo: Path, overrides: dict) -> None:
    params = yaml.safe_load((repo / "params.yaml").read_text())
    for section, values in overrides.items():
        params[section].update(values)
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))


def _env(repo: Path) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "DVC_"))}
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env['PATH']}"
    env["PYTHONPATH"] = str(repo)  # the copy's code, not the editable install's
    # The tiny runs last seconds: sample the system metrics every second, or they show none.
    env["MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL"] = "1"
    return env


def _run(repo: Path, *args: str, ok: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run(
        list(args), cwd=repo, env=_env(repo), capture_output=True, text=True, timeout=900
    )
    if ok and proc.returncode != 0:
        raise AssertionError(
            f"{' '.join(args)} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
        )
    return proc


def _runs(repo: Path):
    import mlflow

    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{repo / paths.MLFLOW_DB}")
    exps = client.search_experiments()
    return client, client.search_runs([e.experiment_id for e in exps])


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory):
    repo = _copy_repo(tmp_path_factory.mktemp("repo"))
    _set_params(repo, TINY_PIPELINE)
    subprocess.run(
        ["git", "commit", "-qam", "tiny"],
        cwd=repo,
        check=True,
        env={
            **os.environ,
            **_env(repo),
            "GIT_AUTHOR_NAME": "t",
            "GIT_AUTHOR_EMAIL": "t@t",
            "GIT_COMMITTER_NAME": "t",
            "GIT_COMMITTER_EMAIL": "t@t",
        },
    )
    t0 = time.perf_counter()
    _run(repo, "dvc", "repro")
    print(f"tiny dvc repro: {time.perf_counter() - t0:.0f} s")
    return repo


def test_every_declared_output_is_written(pipeline):
    for p in (
        paths.MODEL,
        paths.TRAIN_METRICS,
        paths.TRAIN_HISTORY,
        paths.TRAIN_SCHEDULE,
        paths.TRAIN_RUN,
        paths.LR_FIND_METRICS,
        paths.LR_FIND_CURVE,
        paths.LR_FIND_RUN,
        paths.EVAL_METRICS,
        paths.PREDICTIONS,
        paths.REPORT,
        paths.DATA_METRICS,
    ):
        assert (pipeline / p).exists(), p
    pngs = sorted(f.name for f in (pipeline / paths.PLOTS_DIR).glob("*.png"))
    assert pngs == sorted(
        [
            "lr_find.png",
            "history.png",
            "schedule.png",
            "confusion_matrix.png",
            "per_class_accuracy.png",
            "misclassified.png",
            "augmented.png",
        ]
    )
    assert not (pipeline / paths.RESUME_STATE).exists()


def test_outputs_agree(pipeline):
    lr = json.loads((pipeline / paths.LR_FIND_METRICS).read_text())
    train = json.loads((pipeline / paths.TRAIN_METRICS).read_text())
    ev = json.loads((pipeline / paths.EVAL_METRICS).read_text())
    assert (
        train["max_lr"] == lr["max_lr"] == lr[lr["method"]] and train["max_lr_source"] == "lr_find"
    )
    assert ev["num_test"] == 500 and ev["misclassified"] == 500 - ev["correct"]
    assert ev["accuracy"] == pytest.approx(train["test_acc"], abs=1e-6)
    rows = (pipeline / paths.PREDICTIONS).read_text().splitlines()
    assert rows[0].startswith("index,actual,predicted") and len(rows) == 501
    assert (
        f"**Test accuracy: {100 * ev['accuracy']:.2f}%**" in (pipeline / paths.REPORT).read_text()
    )


def test_mlflow_holds_both_runs_with_params_curves_and_figures(pipeline):
    client, runs = _runs(pipeline)
    by_stage = {r.data.tags["dvc.stage"]: r for r in runs}
    assert set(by_stage) == {"lr_find", "train"} and all(r.info.status == "FINISHED" for r in runs)
    lr_run, train_run = by_stage["lr_find"], by_stage["train"]
    assert lr_run.data.params["lr_find.num_iter"] == "40"
    assert len(client.get_metric_history(lr_run.info.run_id, "lr_find/smooth_loss")) >= 10
    assert "figures/lr_find.png" in [
        a.path for a in client.list_artifacts(lr_run.info.run_id, "figures")
    ]
    assert train_run.data.tags["lr_find_run_id"] == lr_run.info.run_id
    assert (
        train_run.data.params["max_lr_source"] == "lr_find" and train_run.data.params["parameters"]
    )
    history = client.get_metric_history(train_run.info.run_id, "test/accuracy")
    assert [m.step for m in history] == [1, 2]
    assert (
        "eval/accuracy" in train_run.data.metrics
        and "eval_per_class/cat.f1" in train_run.data.metrics
        and train_run.data.tags.get("plots.done") == "true"
    )
    figs = {a.path for a in client.list_artifacts(train_run.info.run_id, "figures")}
    assert {
        "figures/history.png",
        "figures/confusion_matrix.png",
        "figures/misclassified.png",
    } <= figs
    ref = json.loads((pipeline / paths.TRAIN_RUN).read_text())
    assert ref["run_id"] == train_run.info.run_id
    for run in runs:  # artifacts at the repository root, whatever the working directory was
        assert run.info.artifact_uri.startswith((pipeline / paths.MLFLOW_ARTIFACTS).as_uri())


def test_mlflow_shows_named_runs_datasets_system_metrics_and_the_registered_model(
    pipeline, tmp_path
):
    """What a person finds in the MLflow UI after `dvc repro`, through the client."""
    import mlflow
    import numpy as np

    from onecycle.prepared import load_prepared

    client, runs = _runs(pipeline)
    exp = client.get_experiment(runs[0].info.experiment_id)
    assert exp.tags["mlflow.experimentKind"] == "custom_model_development"  # the runs view
    commit = _run(pipeline, "git", "rev-parse", "--short=7", "HEAD").stdout.strip()
    by_stage = {r.data.tags["dvc.stage"]: r for r in runs}
    assert {r.info.run_name for r in runs} == {f"repro@{commit} · {s}" for s in by_stage}
    data = load_prepared(pipeline / paths.PREPARED_DIR)
    digest = data.meta["fingerprint"]
    for stage, want in (("lr_find", {"training"}), ("train", {"training", "testing"})):
        inputs = by_stage[stage].inputs.dataset_inputs
        got = {i.tags[0].value: i.dataset for i in inputs}
        assert set(got) == want and {d.digest for d in got.values()} == {digest}
        assert got["training"].name == "cifar10-jpg.tar.gz:train"
    train = by_stage["train"]
    assert any(k.startswith("system/cpu_utilization") for k in train.data.metrics), sorted(
        train.data.metrics
    )
    # the model: logged by train, its metrics from evaluate, registered, loadable by name
    ref = json.loads((pipeline / paths.TRAIN_RUN).read_text())
    logged = client.get_logged_model(ref["model_id"])
    assert logged.source_run_id == train.info.run_id
    assert {m.key for m in logged.metrics} >= {"eval/accuracy", "eval/loss"}
    (version,) = client.search_model_versions("name = 'cifar10-resnet9'")
    assert train.data.tags["registered_model"] == f"cifar10-resnet9/{version.version}"
    mlflow.set_tracking_uri(f"sqlite:///{pipeline / paths.MLFLOW_DB}")
    model = mlflow.pyfunc.load_model(f"models:/cifar10-resnet9/{version.version}")
    assert model.metadata.metadata["classes"] == data.classes
    probs = model.predict(data.x_test[:64])
    assert probs.shape == (64, len(data.classes)) and np.allclose(probs.sum(1), 1, atol=1e-5)
    import csv

    with open(pipeline / paths.PREDICTIONS) as f:
        rows = list(csv.DictReader(f))[:64]
    assert [data.classes[i] for i in probs.argmax(1)] == [r["predicted"] for r in rows]
    assert np.allclose(probs.max(1), [float(r["confidence"]) for r in rows], atol=1e-4)
    # predict, on image files, with the checkpoint (its default): evaluate's answers again
    from PIL import Image

    images = []
    for i in range(8):
        images.append(tmp_path / f"test{i}.png")
        Image.fromarray(data.x_test[i]).save(images[-1])
    out = _run(pipeline, sys.executable, "-m", "onecycle.predict", "--top", "1", *map(str, images))
    for line, row in zip(out.stdout.strip().splitlines(), rows, strict=False):
        cls, pct = line.split(": ")[1].rsplit(" ", 1)
        assert cls == row["predicted"], line
        assert float(pct.rstrip("%")) == pytest.approx(100 * float(row["confidence"]), abs=0.06)
    assert len(out.stdout.strip().splitlines()) == 8


def test_second_repro_runs_nothing(pipeline):
    out = _run(pipeline, "dvc", "repro").stdout
    assert "Running stage" not in out, out


def test_a_refused_param_value_loses_no_result(pipeline):
    # Right after the first repro: every stage is up to date and the outputs are its.
    kept = (paths.MODEL, paths.TRAIN_METRICS, paths.TRAIN_RUN, paths.EVAL_METRICS, paths.REPORT)
    before = {p: (pipeline / p).read_bytes() for p in kept}
    proc = _run(pipeline, "dvc", "exp", "run", "-S", "train.batch_size=0", ok=False)
    out = proc.stderr + proc.stdout
    assert proc.returncode != 0 and "train.batch_size" in out
    assert "Running stage 'train'" not in out
    assert {p: (pipeline / p).read_bytes() for p in kept} == before
    _reset_params(pipeline)  # the documented way back, even where git shows params.yaml clean
    out = _run(pipeline, "dvc", "repro").stdout
    assert "Running stage 'train'" not in out, out  # the kept results are still the current ones


def test_plots_show_renders(pipeline):
    out = pipeline / "dvc_plots_test"
    _run(pipeline, "dvc", "plots", "show", "-o", str(out))
    html = (out / "index.html").read_text()
    assert "LR range test" in html and "Confusion matrix" in html


def test_max_lr_override_reruns_train_not_lr_find(pipeline):
    proc = _run(pipeline, "dvc", "exp", "run", "-S", "train.max_lr=0.05")
    out = proc.stdout
    assert "Running stage 'train'" in out and "Running stage 'lr_find'" not in out
    assert "Running stage 'download'" not in out
    train = json.loads((pipeline / paths.TRAIN_METRICS).read_text())
    assert train["max_lr"] == 0.05 and train["max_lr_source"] == "params"
    _, runs = _runs(pipeline)
    latest = max(
        (r for r in runs if r.data.tags["dvc.stage"] == "train"), key=lambda r: r.info.start_time
    )
    assert latest.data.params["max_lr_used"] == "0.05" and latest.data.tags.get("dvc.exp_name")


def _reset_params(repo: Path) -> None:
    """The README's way back to the committed params (works where `git checkout` does not)."""
    _run(repo, "make", "reset-params")
    head = _run(repo, "git", "show", "HEAD:params.yaml").stdout
    assert (repo / "params.yaml").read_text() == head


def test_a_typo_given_to_exp_run_fails_loudly(pipeline):
    # DVC refuses `-S train.max_lrr=...` itself (the key does not exist); `+` makes DVC add it,
    # and then check_params stops it before any stage runs.
    proc = _run(pipeline, "dvc", "exp", "run", "-S", "+train.max_lrr=0.05", ok=False)
    out = proc.stderr + proc.stdout
    assert proc.returncode != 0
    assert "train.max_lrr: unknown key" in out and "Running stage 'train'" not in out
    _reset_params(pipeline)


def test_a_typo_in_a_new_section_fails_loudly(pipeline):
    proc = _run(pipeline, "dvc", "exp", "run", "-S", "+trian.epochs=1", ok=False)
    out = proc.stderr + proc.stdout
    assert proc.returncode != 0 and "trian: unknown key (a typo of 'train'?)" in out
    _reset_params(pipeline)


def test_params_changed_while_train_runs_are_not_recorded(pipeline):
    _reset_params(pipeline)
    _set_params(pipeline, {"train": {"epochs": 3}})
    proc = subprocess.Popen(
        ["dvc", "repro"],
        cwd=pipeline,
        env=_env(pipeline),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    seen = []
    for line in proc.stdout:  # a second `dvc exp run -S train.epochs=4` rewrites params.yaml
        seen.append(line)
        if line.startswith("epoch 1:"):
            _set_params(pipeline, {"train": {"epochs": 4}})
            break
    out = "".join(seen) + proc.communicate(timeout=300)[0]
    assert proc.returncode != 0 and "params.yaml changed while the stage ran" in out
    lock = yaml.safe_load((pipeline / "dvc.lock").read_text())
    assert lock["stages"]["train"]["params"]["params.yaml"]["train"]["epochs"] != 4
    assert "train" in _run(pipeline, "dvc", "status").stdout  # not called up to date
    _reset_params(pipeline)


def test_sigterm_leaves_a_resumable_state_and_a_killed_run(pipeline):
    _set_params(pipeline, {"train": {"epochs": 3, "max_lr": 0.07}})
    proc = subprocess.Popen(
        [sys.executable, "-m", "stages.train"],
        cwd=pipeline,
        env=_env(pipeline),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    for line in proc.stdout:  # wait for the first epoch to finish, then stop it mid-run
        if line.startswith("epoch 1:"):
            proc.send_signal(signal.SIGTERM)
            break
    proc.communicate(timeout=120)
    assert proc.returncode != 0
    assert (pipeline / paths.RESUME_STATE).exists()
    _, runs = _runs(pipeline)
    killed = max(
        (r for r in runs if r.data.tags["dvc.stage"] == "train"), key=lambda r: r.info.start_time
    )
    assert killed.info.status == "KILLED"
    out = _run(pipeline, sys.executable, "-m", "stages.train").stdout
    assert "resuming from" in out and not (pipeline / paths.RESUME_STATE).exists()
    _, runs = _runs(pipeline)
    resumed = next(r for r in runs if r.info.run_id == killed.info.run_id)
    assert resumed.info.status == "FINISHED" and resumed.data.tags.get("resumed") == "true"
    _reset_params(pipeline)


def _train(repo: Path, env: dict | None = None) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "stages.train"],
        cwd=repo,
        env=env or _env(repo),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def test_a_run_killed_before_its_first_save_is_closed_by_the_next(pipeline):
    _set_params(pipeline, {"train": {"epochs": 3, "max_lr": 0.07}})
    proc = _train(pipeline)
    for line in proc.stdout:  # universal newlines: the progress bar's "\r" ends a line too
        if "epoch 1/3" in line:
            proc.kill()  # SIGKILL: no handler runs, MLflow never hears the run ended
            break
    proc.communicate(timeout=60)
    (pipeline / paths.RESUME_STATE).unlink(missing_ok=True)  # killed before the first save
    _, runs = _runs(pipeline)
    stale = next(r for r in runs if r.data.tags.get("onecycle.pid") == str(proc.pid))
    assert stale.info.status == "RUNNING"
    out = _train(pipeline).communicate(timeout=300)[0]
    assert "closed 1 run(s) left RUNNING by a killed process" in out
    client, _ = _runs(pipeline)
    assert client.get_run(stale.info.run_id).info.status == "KILLED"
    _reset_params(pipeline)


def _mlflow_server(store: Path):
    port = _free_port()
    server = subprocess.Popen(
        ["mlflow", "server", "--backend-store-uri", f"sqlite:///{store / 'server.db'}",
         "--artifacts-destination", str(store / "artifacts"), "--host", "127.0.0.1",
         "--port", str(port), "--workers", "1"],
        env=_env(store),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    import urllib.request

    for _ in range(120):
        try:
            urllib.request.urlopen(f"{url}/health", timeout=2)
            return server, url
        except OSError:
            time.sleep(0.5)
    os.killpg(server.pid, signal.SIGKILL)
    raise AssertionError("mlflow server did not start within 60 s")


def test_a_tracking_server_lost_mid_training_costs_no_training(pipeline, tmp_path):
    server, url = _mlflow_server(tmp_path)
    _set_params(pipeline, {"train": {"epochs": 3, "max_lr": 0.07}})
    (pipeline / paths.MODEL).unlink(missing_ok=True)
    quick_retries = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0", "MLFLOW_HTTP_REQUEST_TIMEOUT": "5"}
    proc = _train(pipeline, {**_env(pipeline), "MLFLOW_TRACKING_URI": url, **quick_retries})
    seen = []
    for line in proc.stdout:
        seen.append(line)
        if line.startswith("epoch 1:"):
            os.killpg(server.pid, signal.SIGKILL)  # the server dies after the first epoch
            server.wait()
            break
    out = "".join(seen) + proc.communicate(timeout=300)[0]
    assert proc.returncode == 0, out
    assert "warning: MLflow at" in out and "is missing:" in out and "test/accuracy" in out
    assert "epoch 3:" in out and (pipeline / paths.MODEL).exists()
    _reset_params(pipeline)


def test_an_unreachable_tracking_server_stops_the_stage_at_once(pipeline):
    uri = f"http://127.0.0.1:{_free_port()}"  # nothing listens there
    t0 = time.perf_counter()
    out = _train(pipeline, {**_env(pipeline), "MLFLOW_TRACKING_URI": uri}).communicate(timeout=120)[
        0
    ]
    assert time.perf_counter() - t0 < 40
    assert f"train: error: MLflow store {uri}" in out and "Traceback" not in out
    assert "epoch 1" not in out


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def _mlflow_ui(repo: Path):
    """The real `mlflow ui` (as `make mlflow-ui` starts it) on a free port; yields the base URL
    once its REST API answers, stops it after."""
    import urllib.request

    port = _free_port()
    server = subprocess.Popen(
        ["mlflow", "ui", "--backend-store-uri", f"sqlite:///{repo / paths.MLFLOW_DB}",
         "--host", "127.0.0.1", "--port", str(port), "--workers", "1"],
        cwd=repo,
        env=_env(repo),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    try:
        for _ in range(120):  # up to 60 s to start
            try:
                with urllib.request.urlopen(f"{url}/health", timeout=5):
                    break
            except OSError:
                time.sleep(0.5)
        else:
            raise AssertionError("mlflow ui did not answer within 60 s")
        yield url
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=30)


def test_mlflow_ui_serves_the_runs_through_its_rest_api(pipeline):
    import urllib.parse
    import urllib.request

    with _mlflow_ui(pipeline) as url:
        base = f"{url}/api/2.0/mlflow"

        def get(endpoint, **query):
            with urllib.request.urlopen(
                f"{base}/{endpoint}?{urllib.parse.urlencode(query)}", timeout=10
            ) as r:
                return json.loads(r.read())

        exps = get("experiments/search", max_results=10)["experiments"]
        exp_id = next(e["experiment_id"] for e in exps if e["name"] == "cifar10-onecycle")
        req = urllib.request.Request(
            f"{base}/runs/search",
            method="POST",
            headers={"Content-Type": "application/json"},
            data=json.dumps({"experiment_ids": [exp_id], "max_results": 100}).encode(),
        )
        with urllib.request.urlopen(req, timeout=10) as r:
            runs = json.loads(r.read())["runs"]
        tag = {
            r["info"]["run_id"]: {t["key"]: t["value"] for t in r["data"].get("tags", [])}
            for r in runs
        }
        stages = {tag[r["info"]["run_id"]]["dvc.stage"] for r in runs}
        assert {"lr_find", "train"} <= stages
        train = next(
            r
            for r in runs
            if tag[r["info"]["run_id"]]["dvc.stage"] == "train"
            and "eval/accuracy" in {m["key"] for m in r["data"].get("metrics", [])}
        )
        rid = train["info"]["run_id"]
        params = {p["key"]: p["value"] for p in train["data"]["params"]}
        assert params["train.epochs"] and params["max_lr_used"]
        hist = get("metrics/get-history", run_id=rid, metric_key="train/loss")["metrics"]
        assert [m["step"] for m in hist] == list(range(1, len(hist) + 1)) and len(hist) >= 2
        files = {f["path"] for f in get("artifacts/list", run_id=rid, path="figures")["files"]}
        assert {
            "figures/history.png",
            "figures/confusion_matrix.png",
            "figures/lr_find.png",
        } <= files


SCREENSHOTS = Path(os.environ.get("ONECYCLE_TEST_ARTIFACTS", ROOT / "test-artifacts"))


def _chrome():
    """Headless Chromium through chromedriver (Debian's chromium and chromium-driver), or a skip
    that says what to install."""
    missing = [b for b in ("chromium", "chromedriver") if not shutil.which(b)]
    if missing:
        pytest.skip(
            f"{' and '.join(missing)} not found: the browser test needs Debian's chromium and "
            "chromium-driver (`apt-get install chromium chromium-driver`; .ci/run does it as root)"
        )
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    opts = webdriver.ChromeOptions()
    opts.binary_location = shutil.which("chromium")
    for arg in (
        "--headless=new",
        "--no-sandbox",
        "--disable-dev-shm-usage",
        "--window-size=1600,1000",
        "--disable-gpu",
    ):
        opts.add_argument(arg)  # fmt: skip
    return webdriver.Chrome(options=opts, service=Service(shutil.which("chromedriver")))


def _wait_for_text(driver, *texts: str, seconds: float = 60) -> str:
    """The page's visible text once it shows every one of ``texts``."""
    from selenium.webdriver.common.by import By

    deadline = time.monotonic() + seconds
    body = ""
    while time.monotonic() < deadline:
        body = driver.find_element(By.TAG_NAME, "body").text
        if all(t in body for t in texts):
            return body
        time.sleep(0.5)
    missing = [t for t in texts if t not in body]
    raise AssertionError(f"the page never showed {missing}; it showed:\n{body[:3000]}")


def test_the_mlflow_ui_in_a_real_browser_shows_runs_accuracy_model_and_dataset(pipeline):
    """What a person sees after `make mlflow-ui`, at the URL it prints: the experiment's runs
    table (not MLflow 3's GenAI overview) with both runs by name and the dataset; the train run's
    page with the test accuracy, the dataset and the registered model. Screenshots land in
    test-artifacts/."""
    from onecycle.tracking import ui_url

    client, _ = _runs(pipeline)
    _run(pipeline, "dvc", "repro")  # the workspace's runs, whatever earlier tests left
    lr_find, train = (
        client.get_run(json.loads((pipeline / p).read_text())["run_id"])
        for p in (paths.LR_FIND_RUN, paths.TRAIN_RUN)
    )
    accuracy = train.data.metrics["eval/accuracy"]
    registered = train.data.tags["registered_model"].replace("/", " v")  # "cifar10-resnet9 v1"
    driver = _chrome()
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    try:
        with _mlflow_ui(pipeline) as url:
            driver.get(ui_url(url, pipeline))
            try:
                table = _wait_for_text(
                    driver, lr_find.info.run_name, train.info.run_name, "cifar10-jpg.tar.gz:train"
                )
            finally:
                driver.save_screenshot(str(SCREENSHOTS / "mlflow-runs-table.png"))
            assert "matching runs" in table and "Token usage" not in table  # runs, not GenAI
            run_page = f"#/experiments/{train.info.experiment_id}/runs/{train.info.run_id}"
            driver.get(f"{url}/{run_page}?workflowType=machine_learning")
            try:
                page = _wait_for_text(driver, train.info.run_name, "eval/accuracy")
            finally:
                driver.save_screenshot(str(SCREENSHOTS / "mlflow-train-run.png"))
            lines = page.split("\n")
            shown = lines[lines.index("eval/accuracy") + 1]  # the value under the metric's name
            assert float(shown) == pytest.approx(accuracy, abs=1e-3), shown
            assert "cifar10-jpg.tar.gz:train" in page and "Registered models" in page
            assert registered in page.replace("\nv", " v"), registered
    finally:
        driver.quit()


TINY_STUDIES = {
    "tiny": """
name: tiny
description: a fixed LR against the steepest pick, two seeds (the test suite's study-lr)
common: {train.epochs: 1}
settings:
  lr-0.05: {train.max_lr: 0.05}
picks: [steepest]
seeds: [0, 1]
figure: max_lr
""",
    "tiny-schedules": """
name: tiny-schedules
description: 1cycle against a cyclical LR, two seeds (the test suite's study-schedules)
common: {train.epochs: 2}
settings:
  onecycle: {train.schedule: onecycle}
  cyclic: {train.schedule: cyclic, train.cycle_epochs: 1}
seeds: [0, 1]
figure: epochs
""",
    "tiny-transfer": """
name: tiny-transfer
description: ResNet-18 trained, then its checkpoint frozen on the data (the suite's study-transfer)
source:
  checkpoint: weights/source-resnet18.pt
  overrides: {model.arch: resnet18, train.epochs: 1}
common: {model.arch: resnet18, train.epochs: 1, lr_find.smooth_beta: 0.8}
settings:
  frozen: {model.pretrained: weights/source-resnet18.pt, model.freeze: backbone}
seeds: [0]
figure: epochs
""",
}


def _study(repo: Path, name: str) -> tuple[list[dict], str]:
    _reset_params(repo)
    (repo / f"{name}.yaml").write_text(TINY_STUDIES[name])
    _run(repo, "git", "add", f"{name}.yaml")
    _run(repo, "git", "commit", "-qm", f"{name} study")
    _run(repo, sys.executable, "-m", "onecycle.study", "run", f"{name}.yaml")
    out = repo / "reports" / name
    return json.loads((out / "results.json").read_text()), (out / "report.md").read_text()


def _check_report_against_store(repo: Path, name: str, results: list[dict], report: str):
    """Every number the report uses is the store's; one parent run holds the study's runs."""
    import numpy as np

    client, runs = _runs(repo)
    by_id = {r.info.run_id: r for r in runs}
    for r in results:
        run = by_id[r["run_id"]]
        assert run.data.metrics["eval/accuracy"] == r["accuracy"]
        assert run.data.tags["dvc.exp_name"] == f"{name}-{r['label']}-s{r['seed']}"
        assert float(run.data.params["max_lr_used"]) == r["max_lr"]
        history = client.get_metric_history(r["run_id"], "test/accuracy")
        assert [m.value for m in sorted(history, key=lambda m: m.step)] == r["test_acc"]
    for label in {r["label"] for r in results}:
        mean = 100 * np.mean([r["accuracy"] for r in results if r["label"] == label])
        assert f"| {label} | 2 | {mean:.2f} ± " in report, report
    assert (repo / "reports" / name / f"{name}.png").exists()
    parents = {by_id[r["run_id"]].data.tags.get("mlflow.parentRunId") for r in results}
    parent = client.get_run(parents.pop())
    assert not parents and parent.data.tags["study"] == name


@pytest.mark.long
def test_a_study_runs_as_named_experiments_and_reports_what_the_store_holds(pipeline):
    results, report = _study(pipeline, "tiny")
    names = {(r["label"], r["seed"]) for r in results}
    assert names == {(s, seed) for s in ("lr-0.05", "pick-steepest") for seed in (0, 1)}
    _check_report_against_store(pipeline, "tiny", results, report)
    shown = json.loads(_run(pipeline, "dvc", "exp", "show", "--json").stdout)
    exps = {  # queued experiments show in `dvc exp show`, by name, with their metrics
        rev["name"]: rev["data"]["metrics"]
        for entry in shown
        for exp in entry.get("experiments") or []
        if (rev := exp["revs"][0]).get("name")
    }
    for r in results:
        train = exps[f"tiny-{r['label']}-s{r['seed']}"]["metrics/train.json"]["data"]
        assert train["max_lr"] == pytest.approx(r["max_lr"])
        if r["label"] == "pick-steepest":  # the pick is that seed's range-test choice
            lr_find = exps[f"tiny-lr-0.05-s{r['seed']}"]["metrics/lr_find.json"]["data"]
            assert r["max_lr"] == pytest.approx(lr_find["steepest"])
    strays = [  # queued runs record into the project's one store, not their temp copies
        p
        for p in (pipeline / ".dvc" / "tmp").rglob("*")
        if p.name in ("mlflow.db", "mlruns", "mlartifacts")
    ]
    assert not strays, strays
    assert not (pipeline / "mlruns").exists()
    # started again, it runs nothing; its report alone reads the same runs
    out = _run(pipeline, sys.executable, "-m", "onecycle.study", "run", "tiny.yaml").stdout
    assert json.loads((pipeline / "reports" / "tiny" / "results.json").read_text()) == results, out


@pytest.mark.long
def test_a_transfer_study_trains_resnet18_then_freezes_its_checkpoint_through_dvc(pipeline):
    """model.arch resnet18 on a few hundred real images, end to end through DVC: the study's
    source run first; its models/model.pt, fetched from the DVC cache, starts the frozen run,
    whose backbone comes out exactly as the source left it and whose classifier alone trained."""
    import hashlib

    import torch

    from onecycle import checkpoint, study

    results, report = _study(pipeline, "tiny-transfer")
    assert [(r["label"], r["seed"]) for r in results] == [("frozen", 0)]
    source = checkpoint.read_weights(pipeline / "weights" / "source-resnet18.pt")
    assert source["config"]["arch"] == "resnet18" and source["classes"]
    assert "Source model `tiny-transfer-source`" in report and "% on its own test split" in report

    client, runs = _runs(pipeline)
    run = client.get_run(results[0]["run_id"])
    digest = hashlib.sha256((pipeline / "weights" / "source-resnet18.pt").read_bytes()).hexdigest()
    assert run.data.params["model.arch"] == "resnet18"
    assert run.data.params["start.weights_sha256"] == digest
    assert run.data.params["start.normalization"].startswith("checkpoint source-resnet18.pt")
    assert int(run.data.params["trainable_parameters"]) == 512 * 10 + 10  # the classifier only

    frozen = pipeline / "frozen.pt"  # the frozen run's own checkpoint, from the DVC cache
    rev = study.exp_commit("tiny-transfer-frozen-s0", pipeline)
    _run(pipeline, "dvc", "get", ".", "models/model.pt", "--rev", rev, "-o", str(frozen))
    trained = checkpoint.read_weights(frozen)
    for k, v in source["model"].items():  # BatchNorm statistics included
        if not k.startswith("fc."):
            assert torch.equal(trained["model"][k], v), k
    assert not torch.equal(trained["model"]["fc.weight"], source["model"]["fc.weight"])
    assert trained["inputs"]["mean"] == source["inputs"]["mean"]  # the source's normalization


@pytest.mark.long
def test_a_schedules_study_reports_each_schedules_epochs_from_the_store(pipeline):
    results, report = _study(pipeline, "tiny-schedules")
    assert {(r["label"], r["seed"]) for r in results} == {
        (s, seed) for s in ("onecycle", "cyclic") for seed in (0, 1)
    }
    assert all(len(r["test_acc"]) == 2 for r in results)  # the figure's per-epoch points
    _check_report_against_store(pipeline, "tiny-schedules", results, report)
    assert (
        "tiny-schedules-onecycle" not in (pipeline / "reports" / "tiny" / "report.md").read_text()
    )
