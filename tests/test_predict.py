"""predict and the MLflow model: raw images of any size in, the checkpoint's and the logged
model's probabilities agree, and bad input is named."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from onecycle.commands import predict
from onecycle.config import ModelConfig
from onecycle.tracking import mlmodel
from onecycle.training import checkpoint
from onecycle.training.model import ResNet9, ResNetConfig

from .conftest import ROOT

CLASSES = [f"class{i}" for i in range(10)]
MEAN, STD = (0.49, 0.48, 0.45), (0.25, 0.24, 0.26)


@pytest.fixture
def model_file(tmp_path):
    torch.manual_seed(0)
    net = ResNet9(ResNetConfig(width=4)).eval()
    for m in net.modules():  # non-trivial running stats, so eval-mode BN matters
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.2, 0.2)
            m.running_var.uniform_(0.5, 1.5)
    path = tmp_path / "model.pt"
    inputs = {"image_size": 32, "mean": list(MEAN), "std": list(STD)}
    checkpoint.save_weights(net, ModelConfig(width=4), CLASSES, path, inputs)
    return net, path


@pytest.fixture
def images(tmp_path):
    """A colour JPEG at the model's size, a grayscale PNG of another size, a palette GIF."""
    rng = np.random.default_rng(0)
    files = []
    for name, mode, size in (("a.jpg", "RGB", 32), ("b.png", "L", (57, 41)), ("c.gif", "P", 20)):
        shape = (size, size) if isinstance(size, int) else size[::-1]
        pixels = rng.integers(0, 256, (*shape, 3) if mode == "RGB" else shape, dtype=np.uint8)
        Image.fromarray(pixels, "RGB" if mode == "RGB" else "L").convert(mode).save(tmp_path / name)
        files.append(tmp_path / name)
    return files


def test_predict_reads_any_image_as_the_data_stage_and_ranks_the_classes(model_file, images):
    net, path = model_file
    model = predict.load_model(str(path))
    got = predict.predict(model, images, top=3)
    x = predict.read_images(images, 32)
    assert x.shape == (3, 32, 32, 3) and x.dtype == np.uint8
    with torch.no_grad():
        mean, std = torch.tensor(MEAN).view(1, 3, 1, 1), torch.tensor(STD).view(1, 3, 1, 1)
        ref = torch.softmax(net((torch.from_numpy(x).permute(0, 3, 1, 2) / 255 - mean) / std), 1)
    for row, probs in zip(got, ref.numpy(), strict=True):
        assert [c for c, _ in row] == [CLASSES[i] for i in np.argsort(-probs)[:3]]
        assert [p for _, p in row] == pytest.approx(sorted(probs)[::-1][:3], abs=1e-5)


def test_the_logged_mlflow_model_takes_raw_images_and_matches_the_checkpoint(
    model_file, images, tmp_path, monkeypatch
):
    import mlflow

    net, path = model_file
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path / 'mlflow.db'}")
    mlflow.set_experiment("predict")  # not an experiment id another test's store left active
    x = predict.read_images(images, 32)
    with mlflow.start_run() as run:
        model_id = mlmodel.log(net, CLASSES, MEAN, STD, x, run.info.run_id)
    loaded = mlflow.pyfunc.load_model(f"models:/{model_id}")
    assert loaded.metadata.metadata["classes"] == CLASSES
    assert loaded.metadata.get_input_schema().inputs[0].shape == (-1, 32, 32, 3)
    assert [c.name for c in loaded.metadata.get_output_schema().inputs] == CLASSES
    from_ckpt = predict.load_model(str(path)).probabilities(x)
    assert np.allclose(loaded.predict(x), from_ckpt, atol=1e-5)  # batch of 3, example of 2
    by_uri = predict.predict(predict.load_model(f"models:/{model_id}"), images, top=2)
    assert by_uri == [
        [(c, pytest.approx(p, abs=1e-5)) for c, p in row]
        for row in predict.predict(predict.load_model(str(path)), images, top=2)
    ]


def test_a_missing_or_non_image_file_is_named(model_file, tmp_path):
    model = predict.load_model(str(model_file[1]))
    with pytest.raises(predict.PredictError, match="nope.png: no such file"):
        predict.predict(model, [tmp_path / "nope.png"], 3)
    (tmp_path / "notes.txt").write_text("not an image")
    with pytest.raises(predict.PredictError) as err:
        predict.predict(model, [tmp_path / "notes.txt"], 3)
    assert str(err.value) == (  # named by its path, not PIL's in-memory buffer
        f"{tmp_path / 'notes.txt'}: unreadable image (not a format PIL can identify); "
        "is it an image file?"
    )


def test_a_model_that_names_other_classes_than_it_was_trained_on_is_refused(model_file, images):
    model = predict.load_model(str(model_file[1]))
    model.classes = ["cat", "dog", "ship"]  # as an edited checkpoint or model metadata would
    with pytest.raises(predict.PredictError, match="10 outputs per image but names 3 classes"):
        predict.predict(model, images, 3)


def test_a_checkpoint_without_input_details_or_a_bad_uri_says_what_to_do(tmp_path, monkeypatch):
    net = ResNet9(ResNetConfig(width=4))
    checkpoint.save_weights(net, ModelConfig(width=4), CLASSES, tmp_path / "old.pt")
    with pytest.raises(predict.PredictError, match="dvc repro -f train"):
        predict.load_model(str(tmp_path / "old.pt"))
    with pytest.raises(predict.PredictError, match="not found"):
        predict.load_model(str(tmp_path / "gone.pt"))
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    with pytest.raises(predict.PredictError, match="cannot load MLflow model models:/nothing/1"):
        predict.load_model("models:/nothing/1")


def test_the_command_prints_top_classes_and_fails_in_one_line(model_file, images):
    cmd = [
        sys.executable,
        "-m",
        "onecycle.commands.predict",
        "--model",
        str(model_file[1]),
        "--top",
        "2",
    ]
    ok = subprocess.run([*cmd, *map(str, images)], capture_output=True, text=True, cwd=ROOT)
    assert ok.returncode == 0, ok.stderr
    lines = ok.stdout.strip().splitlines()
    assert len(lines) == 3 and lines[0].startswith(f"{images[0]}: class")
    assert lines[0].count("%") == 2
    bad = subprocess.run([*cmd, "missing.jpg"], capture_output=True, text=True, cwd=ROOT)
    assert bad.returncode == 1 and bad.stderr.strip() == "predict: error: missing.jpg: no such file"


class _Trap:
    """A stand-in for a malicious model: unpickling it creates ``marker`` (a real attack would run
    anything else)."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (Path(self.marker),))


def test_a_registered_model_of_another_flavor_is_refused_and_its_pickle_never_runs(
    tmp_path, monkeypatch
):
    import mlflow

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    mlflow.set_tracking_uri(uri)
    mlflow.set_experiment("trap")
    marker = tmp_path / "pwned"

    class Trap(mlflow.pyfunc.PythonModel):
        def predict(self, context, model_input):
            return model_input

        def __reduce__(self):  # what cloudpickle stores: "call Path.touch(marker)" on load
            return _Trap(marker).__reduce__()

    with mlflow.start_run():
        info = mlflow.pyfunc.log_model(
            name="model", python_model=Trap(), pip_requirements=["mlflow"]
        )
    mlflow.register_model(info.model_uri, "cifar10-resnet9")
    with pytest.raises(mlmodel.ModelFlavorError) as err:
        predict.load_model("models:/cifar10-resnet9/1")
    msg = str(err.value)
    assert msg.startswith("MLflow model models:/cifar10-resnet9/1 is flavor python_function")
    assert "mlflow.pyfunc.model" in msg and "\n" not in msg
    assert not marker.exists(), "the model's pickle ran"
    with pytest.raises(AttributeError):  # the trap is real: MLflow runs it, then fails
        mlflow.pyfunc.load_model("models:/cifar10-resnet9/1")
    assert marker.exists()


def test_a_fifo_is_named_in_one_line_and_nothing_hangs(tmp_path):
    """`mkfifo x.jpg; predict x.jpg` used to block forever on the open."""
    import os
    import threading

    fifo = tmp_path / "x.jpg"
    os.mkfifo(fifo)
    errors = []

    def read():
        try:
            predict.read_images([fifo], 32)
        except predict.PredictError as exc:
            errors.append(str(exc))

    worker = threading.Thread(target=read, daemon=True)
    worker.start()
    worker.join(10)
    assert not worker.is_alive(), "reading a FIFO blocked"
    assert errors == [f"{fifo}: not a regular file (a FIFO); give image files"]


def test_an_image_over_the_pixel_limit_names_predicts_own_option(tmp_path):
    """predict used to advise `dvc exp run -S data.max_image_pixels=...`, which does nothing for
    predict (issue 26, item 8): its own --max-pixels is named, and raising it lets the image in."""
    from PIL import Image

    big = tmp_path / "big.png"
    Image.new("RGB", (100, 80)).save(big)
    with pytest.raises(predict.PredictError) as err:
        predict.read_images([big], 32, max_pixels=5000)
    assert str(err.value) == (
        f"{big}: image too large (100x80 = 8,000 pixels), over --max-pixels=5,000; refused "
        "before decoding it. If images this large are expected, raise it: --max-pixels <pixels>"
    )
    assert predict.read_images([big], 32, max_pixels=8000).shape == (1, 32, 32, 3)
    with pytest.raises(SystemExit):  # the option is there (argparse exits on --help)
        predict.main(["--help"])
