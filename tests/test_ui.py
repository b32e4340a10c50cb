"""The MLflow UI on the shared tiny run, as `make mlflow-ui` starts it: its REST API, and what a
person sees in a real browser at the address `make mlflow-ui` prints. One `mlflow ui` serves both."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import time
import urllib.parse
import urllib.request
from pathlib import Path

import pytest

from onecycle import paths

from .tiny_repo import ROOT, env, free_port, runs, wait_until_healthy

pytestmark = pytest.mark.slow

SCREENSHOTS = Path(os.environ.get("ONECYCLE_TEST_ARTIFACTS", ROOT / "test-artifacts"))


@pytest.fixture(scope="module")
def ui(pipeline):
    """The real `mlflow ui` on the shared run's store, on a free port; its base URL once its REST
    API answers."""
    port = free_port()
    server = subprocess.Popen(
        ["mlflow", "ui", "--backend-store-uri", f"sqlite:///{pipeline / paths.MLFLOW_DB}",
         "--host", "127.0.0.1", "--port", str(port), "--workers", "1"],
        cwd=pipeline,
        env=env(pipeline, MLFLOW_SERVER_ENABLE_JOB_EXECUTION="false"),  # as make mlflow-ui
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until_healthy(url, server, 60)
        yield url
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=30)


def test_mlflow_ui_serves_the_runs_through_its_rest_api(ui):
    base = f"{ui}/api/2.0/mlflow"

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
        found = json.loads(r.read())["runs"]
    tag = {
        r["info"]["run_id"]: {t["key"]: t["value"] for t in r["data"].get("tags", [])}
        for r in found
    }
    assert {tag[r["info"]["run_id"]]["dvc.stage"] for r in found} == {"lr_find", "train"}
    train = next(r for r in found if tag[r["info"]["run_id"]]["dvc.stage"] == "train")
    assert "eval/accuracy" in {m["key"] for m in train["data"]["metrics"]}
    rid = train["info"]["run_id"]
    params = {p["key"]: p["value"] for p in train["data"]["params"]}
    assert params["train.epochs"] and params["max_lr_used"]
    hist = get("metrics/get-history", run_id=rid, metric_key="train/loss")["metrics"]
    assert [m["step"] for m in hist] == list(range(1, len(hist) + 1)) and len(hist) >= 2
    files = {f["path"] for f in get("artifacts/list", run_id=rid, path="figures")["files"]}
    assert {"figures/history.png", "figures/confusion_matrix.png", "figures/lr_find.png"} <= files


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
        "--disable-background-networking",
        "--disable-component-update",
        "--no-first-run",
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


def test_the_mlflow_ui_in_a_real_browser_shows_runs_accuracy_model_and_dataset(pipeline, ui):
    """What a person sees after `make mlflow-ui`, at the URL it prints: the experiment's runs
    table (not MLflow 3's GenAI overview) with both runs by name and the dataset; the train run's
    page with the test accuracy, the dataset and the registered model. Screenshots land in
    test-artifacts/."""
    from onecycle.tracking.connect import ui_url

    client, _ = runs(pipeline)
    lr_find, train = (
        client.get_run(json.loads((pipeline / p).read_text())["run_id"])
        for p in (paths.LR_FIND_RUN, paths.TRAIN_RUN)
    )
    accuracy = train.data.metrics["eval/accuracy"]
    registered = train.data.tags["registered_model"].replace("/", " v")  # "cifar10-resnet9 v1"
    driver = _chrome()
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    try:
        driver.get(ui_url(ui, pipeline))
        try:
            table = _wait_for_text(
                driver, lr_find.info.run_name, train.info.run_name, "cifar10-jpg.tar.gz:train"
            )
        finally:
            driver.save_screenshot(str(SCREENSHOTS / "mlflow-runs-table.png"))
        assert "matching runs" in table and "Token usage" not in table  # runs, not GenAI
        run_page = f"#/experiments/{train.info.experiment_id}/runs/{train.info.run_id}"
        driver.get(f"{ui}/{run_page}?workflowType=machine_learning")
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
