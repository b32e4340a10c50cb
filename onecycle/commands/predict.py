"""predict: the top classes of image files, from the pipeline's checkpoint or an MLflow model.

    python -m onecycle.commands.predict cat.jpg truck.png                        # models/model.pt
    python -m onecycle.commands.predict --model models:/cifar10-resnet9/3 *.jpg  # the Model Registry
    python -m onecycle.commands.predict --model runs:/<run id>/model --top 5 photo.jpg

Images are read as the data stage reads them (any size, colour or grayscale: converted to RGB,
resized to the model's image size). MLflow URIs resolve against the project's store
(``mlflow.db``) unless ``MLFLOW_TRACKING_URI`` names another.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from onecycle import paths
from onecycle.config import DataConfig
from onecycle.errors import UserError
from onecycle.redact import redact
from onecycle.tracking import connect

MAX_PIXELS = DataConfig.model_fields["max_image_pixels"].default  # the data stage's default


class PredictError(UserError):
    """An image or the model cannot be used; the message names which and why."""


@dataclass
class Model:
    classes: list[str]
    image_size: int
    probabilities: Callable[[np.ndarray], np.ndarray]  # uint8 (N, H, W, 3) -> (N, classes)
    origin: str


def load_checkpoint_model(path: Path) -> Model:
    """The pipeline's weights file, rebuilt from what it carries (no params.yaml, no data)."""
    import torch

    from onecycle.tracking import mlmodel
    from onecycle.training import checkpoint
    from onecycle.training.model import build

    try:
        ckpt = checkpoint.read_weights(path)
    except checkpoint.CheckpointError as exc:
        raise PredictError(f"{exc}, or give --model") from None
    config, classes, inputs = ckpt.get("config") or {}, ckpt.get("classes"), ckpt.get("inputs")
    if not inputs or not classes or "num_classes" not in config:
        raise PredictError(
            f"{path} predates predict (it lacks the image size and normalization); "
            "retrain it with `dvc repro -f train`, or give an MLflow model with --model"
        )
    shape = {k: config[k] for k in ("width", "logit_scale") if k in config}
    net = build(checkpoint.saved_architecture(config)["arch"], config["num_classes"], **shape)
    misfit = checkpoint.state_dict_misfit(net.state_dict(), ckpt["model"])
    if misfit:
        raise PredictError(f"{path}: weights do not fit the model they name:\n{misfit}")
    net.load_state_dict(ckpt["model"])
    model = mlmodel.ImageClassifier(net, inputs["mean"], inputs["std"]).eval()

    def probabilities(images: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            return model(torch.from_numpy(images)).numpy()

    return Model(list(classes), int(inputs["image_size"]), probabilities, str(path))


def load_mlflow_model(uri: str) -> Model:
    """A model logged by the train stage (``models:/<name>/<version>``, ``runs:/<id>/model``,
    ``models:/<model id>`` or a local MLflow model folder).

    Only the torch.export program that train logs is accepted, checked before anything in it is
    read (:func:`mlmodel.load`): a registered model of another flavor may be a pickle that runs
    code when loaded."""
    import tempfile

    import mlflow
    import torch

    from onecycle.tracking import mlmodel

    with tempfile.TemporaryDirectory(prefix="onecycle-predict-") as tmp:
        if Path(uri).exists():
            folder = Path(uri)
        else:
            connect.setup()
            try:  # files only: nothing is loaded yet
                folder = Path(mlflow.artifacts.download_artifacts(artifact_uri=uri, dst_path=tmp))
            except Exception as exc:
                raise PredictError(
                    f"cannot load MLflow model {uri} from {mlflow.get_tracking_uri()} "
                    f"({type(exc).__name__}: {str(exc).splitlines()[0][:300]}); the registered "
                    "ones are on the UI's Models page (make mlflow-ui), or give the checkpoint path"
                ) from None
        net, meta = mlmodel.load(folder, uri)
    if "classes" not in meta or "image_size" not in meta:
        raise PredictError(
            f"MLflow model {uri} does not carry class names and image size in its metadata; it "
            "was not logged by this pipeline's train stage"
        )

    def probabilities(images: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            return net(torch.from_numpy(images)).numpy()

    return Model(list(meta["classes"]), int(meta["image_size"]), probabilities, uri)


def load_model(spec: str) -> Model:
    """A path to a ``.pt`` file is the pipeline's checkpoint; anything else an MLflow model."""
    path = Path(spec)
    if path.suffix == ".pt" or path.is_file():
        return load_checkpoint_model(path)
    return load_mlflow_model(spec)


def read_images(files: list[Path], image_size: int, max_pixels: int = MAX_PIXELS) -> np.ndarray:
    from onecycle.data.imagefolder import not_regular
    from onecycle.data.images import ImageTooLarge, decode_image

    images = []
    for f in files:
        try:
            kind = not_regular(os.stat(f).st_mode)  # never open a FIFO: it blocks forever
            if kind:
                raise PredictError(f"{f}: not a regular file ({kind}); give image files")
            data = f.read_bytes()
        except FileNotFoundError:
            raise PredictError(f"{f}: no such file") from None
        except OSError as exc:
            raise PredictError(f"{f}: cannot read it ({exc.strerror or exc})") from None
        try:
            images.append(decode_image(data, str(f), image_size, max_pixels))
        except ImageTooLarge as exc:  # its advice is the data stage's key: not predict's
            raise PredictError(
                f"{f}: image too large ({exc.size}), over --max-pixels={max_pixels:,}; refused "
                "before decoding it. If images this large are expected, raise it: "
                "--max-pixels <pixels>"
            ) from None
        except UserError as exc:
            raise PredictError(f"{exc}; is it an image file?") from None
    return np.stack(images)


def predict(
    model: Model, files: list[Path], top: int, max_pixels: int = MAX_PIXELS
) -> list[list[tuple[str, float]]]:
    """For each file, its ``top`` classes with their probabilities, most likely first."""
    probs = model.probabilities(read_images(files, model.image_size, max_pixels))
    if probs.ndim != 2 or probs.shape[1] != len(model.classes):
        raise PredictError(
            f"model {model.origin} gives {probs.shape[-1]} outputs per image but names "
            f"{len(model.classes)} classes ({', '.join(model.classes)}): it was trained on other "
            "classes than it says; retrain it"
        )
    order = np.argsort(-probs, axis=1)[:, :top]
    return [
        [(model.classes[j], float(p[j])) for j in row] for p, row in zip(probs, order, strict=True)
    ]


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(
        prog="python -m onecycle.commands.predict",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="\n\n".join(__doc__.split("\n\n")[1:]),
    )
    ap.add_argument("images", nargs="+", type=Path, help="image files (PNG, JPEG, ...)")
    ap.add_argument(
        "--model",
        default=str(paths.MODEL),
        help=f"checkpoint path or MLflow model URI (default: {paths.MODEL})",
    )
    ap.add_argument("--top", type=int, default=3, help="classes shown per image (default: 3)")
    ap.add_argument(
        "--max-pixels",
        type=int,
        default=MAX_PIXELS,
        help=f"larger images are refused before decoding (default: {MAX_PIXELS:,}, as the "
        "data stage's data.max_image_pixels)",
    )
    args = ap.parse_args(argv)
    model = load_model(args.model)
    top = max(1, min(args.top, len(model.classes)))
    for f, best in zip(args.images, predict(model, args.images, top, args.max_pixels), strict=True):
        ranked = ", ".join(f"{c} {100 * p:.1f}%" for c, p in best)
        print(f"{f}: {ranked}")


def run(argv: list[str] | None = None) -> None:
    """The console entry point: a user error is one line and exit status 1."""
    try:
        main(argv)
    except UserError as exc:
        print(f"predict: error: {redact(str(exc))}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    run()
