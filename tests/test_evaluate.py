import numpy as np
import pytest
import torch

from onecycle.config import ModelConfig
from onecycle.reports import report
from onecycle.reports.evaluation import evaluate_logits
from onecycle.training.checkpoint import CheckpointError, save_weights
from onecycle.training.checkpoint import load_weights as load_checkpoint
from onecycle.training.model import ResNet9, ResNetConfig
from onecycle.training.runtime import select_device

CLASSES = ["cat", "dog", "bird"]
CPU = select_device("cpu", 0)


def _made_up():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 3, 300)
    logits = torch.randn(300, 3)
    logits[np.arange(300), torch.as_tensor(y)] += 1.5  # mostly right
    return logits, y


def test_metrics_agree_with_each_other():
    logits, y = _made_up()
    m, pred, conf = evaluate_logits(logits, y, CLASSES)
    cm = np.asarray(m["confusion_matrix"])
    correct = int((logits.argmax(1).numpy() == y).sum())
    assert cm.sum() == len(y) == m["num_test"]
    assert m["misclassified"] == len(y) - correct and m["correct"] == correct
    assert m["accuracy"] == pytest.approx(correct / len(y))
    for i, c in enumerate(CLASSES):
        assert m["per_class"][c]["accuracy"] == pytest.approx(cm[i, i] / cm[i].sum())
        assert m["per_class"][c]["recall"] == pytest.approx(cm[i, i] / cm[i].sum())
        assert m["per_class"][c]["precision"] == pytest.approx(cm[i, i] / cm[:, i].sum())
        assert m["per_class"][c]["support"] == int((y == i).sum())
    assert m["loss"] == pytest.approx(
        float(torch.nn.functional.cross_entropy(logits, torch.as_tensor(y)))
    )
    assert np.all((conf > 1 / 3) & (conf <= 1))
    assert (pred == logits.argmax(1).numpy()).all()


def test_a_perfect_model_scores_one():
    y = np.array([0, 1, 2, 2, 1])
    logits = torch.nn.functional.one_hot(torch.as_tensor(y), 3).float() * 10
    m, *_ = evaluate_logits(logits, y, CLASSES)
    cm = np.asarray(m["confusion_matrix"])
    assert m["accuracy"] == 1.0 and m["misclassified"] == 0 and (cm == np.diag([1, 2, 2])).all()


def _save(tmp_path, width=2, classes=CLASSES):
    model = ResNet9(ResNetConfig(num_classes=len(classes), width=width))
    save_weights(model, ModelConfig(width=width), classes, tmp_path / "model.pt")
    return model


def test_checkpoint_round_trip(tmp_path):
    model = _save(tmp_path)
    loaded = load_checkpoint(tmp_path / "model.pt", ModelConfig(width=2), CLASSES, CPU)
    x = torch.randn(2, 3, 32, 32)
    model.eval()
    assert torch.allclose(model(x), loaded(x), atol=1e-5)


def test_missing_checkpoint_is_a_clear_error(tmp_path):
    with pytest.raises(CheckpointError, match="dvc repro train"):
        load_checkpoint(tmp_path / "model.pt", ModelConfig(width=2), CLASSES, CPU)


def test_checkpoint_of_another_width_or_class_count_is_refused(tmp_path):
    _save(tmp_path, width=2)
    with pytest.raises(CheckpointError, match="width: checkpoint 2 vs now 4"):
        load_checkpoint(tmp_path / "model.pt", ModelConfig(width=4), CLASSES, CPU)
    with pytest.raises(CheckpointError, match="num_classes"):
        load_checkpoint(tmp_path / "model.pt", ModelConfig(width=2), CLASSES + ["fish"], CPU)


class _Code:
    """What a pickled object that runs code looks like to the unpickler."""

    def __reduce__(self):
        import os

        return (os.getcwd, ())


def _write(kind: str, path):
    import pickle
    import zipfile

    if kind == "empty":
        path.write_bytes(b"")
    elif kind == "text":
        path.write_bytes(b"not a checkpoint")
    elif kind == "pickle":
        path.write_bytes(pickle.dumps({"model": {}}, protocol=4))
    elif kind == "code":
        torch.save({"model": _Code()}, path)
    elif kind == "truncated":  # a copy that stopped: torch.save's zip without its end
        torch.save({"model": {"w": torch.zeros(1000)}}, path)
        path.write_bytes(path.read_bytes()[:2000])
    else:
        with zipfile.ZipFile(path, "w") as z:
            z.writestr("a", "b")


@pytest.mark.parametrize(
    "kind, reason",
    [
        ("empty", "(empty: 0 bytes)"),
        ("text", "(not a torch.save file: neither torch's zip format nor a pickle)"),
        ("pickle", "(a pickle, but not one torch.save wrote)"),
        ("code", "it holds more than tensors and plain containers: Trying to load unsupported "
                 "GLOBAL posix.getcwd"),
        ("zip", "(a zip archive, but not one torch.save wrote (it has no data.pkl))"),
        ("truncated", "(cut short: a zip archive without its end (2,000 bytes), as a copy or "
                      "download that stopped leaves it; copy the file again)"),
    ],
)  # fmt: skip
def test_a_file_that_is_not_a_weights_only_checkpoint_is_refused_saying_what_it_is(
    kind, reason, tmp_path
):
    """Never torch's own reasons (`(544502645)`, `()`) nor its advice to load with
    weights_only=False, which would run the code a weights file may carry."""
    _write(kind, tmp_path / "model.pt")
    with pytest.raises(CheckpointError) as err:
        load_checkpoint(tmp_path / "model.pt", ModelConfig(width=2), CLASSES, CPU)
    msg = str(err.value)
    assert msg.startswith(f"{tmp_path / 'model.pt'} is not a loadable weights-only checkpoint")
    assert reason in msg and "\n" not in msg and "weights_only" not in msg, msg


def test_report_names_the_right_accuracy():
    logits, y = _made_up()
    m, *_ = evaluate_logits(logits, y, CLASSES)
    lr = {"method": "valley", "max_lr": 0.2, "valley": 0.2, "steepest": 0.4, "min_div10": 0.05}
    tr = {
        "max_lr": 0.2,
        "max_lr_source": "lr_find",
        "epochs": 3,
        "train_seconds": 12.0,
        "images_per_sec": 900.0,
        "train_acc": 0.5,
    }
    text = report.render(
        lr,
        tr,
        m,
        {"num_train": 600, "num_test": 300, "num_classes": 3},
        [("LR range test", "lr_find.png")],
    )
    assert f"**Test accuracy: {100 * m['accuracy']:.2f}%**" in text
    assert f"{m['misclassified']:,} of 300" in text
    assert "![LR range test](lr_find.png)" in text


def test_a_checkpoint_that_is_a_plain_list_is_refused_by_name(tmp_path):
    torch.save([1, 2, 3], tmp_path / "model.pt")
    with pytest.raises(CheckpointError, match=r"not a checkpoint of this pipeline \(a list"):
        load_checkpoint(tmp_path / "model.pt", ModelConfig(width=2), CLASSES, CPU)


def test_weights_that_do_not_fit_list_the_keys_and_shapes(tmp_path):
    model = _save(tmp_path)
    ckpt = torch.load(tmp_path / "model.pt", weights_only=True)
    del ckpt["model"]["fc.bias"]
    ckpt["model"]["extra.weight"] = torch.zeros(1)
    ckpt["model"]["prep.0.weight"] = torch.zeros(2, 3, 5, 5)
    torch.save(ckpt, tmp_path / "model.pt")
    with pytest.raises(CheckpointError) as err:
        load_checkpoint(tmp_path / "model.pt", ModelConfig(width=2), CLASSES, CPU)
    msg = str(err.value)
    assert "missing (1): fc.bias" in msg and "unexpected (1): extra.weight" in msg
    expected = tuple(model.state_dict()["prep.0.weight"].shape)
    assert f"prep.0.weight: checkpoint (2, 3, 5, 5), model {expected}" in msg
