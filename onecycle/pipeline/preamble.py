"""What lr_find and train do first, written once: their params, the MLflow store checked before
any work, the data-parallel ranks (launched from here when ``base.devices > 1``), the initial
weights (``model.pretrained``) and the prepared data normalized as those weights expect."""

from __future__ import annotations

from dataclasses import dataclass

from onecycle import paths, progress
from onecycle.config import Params, load_params
from onecycle.data.prepared import Prepared, load_prepared
from onecycle.tracking import connect
from onecycle.training import distributed, init_weights
from onecycle.training.runtime import Device


@dataclass(frozen=True)
class TrainingStage:
    params: Params
    dev: Device
    ranks: distributed.Ranks  # rank 0 alone writes outputs and logs to MLflow
    weights: init_weights.InitialWeights
    data: Prepared  # normalized as ``weights`` expect
    warning: str | None  # what the weights say of the data (printed once, by rank 0)


def begin(module: str) -> TrainingStage | None:
    """The stage ``module`` (``stages.train``) set up in this process; None where this process
    only launched its ranks under torchrun and they are done. An unusable MLflow store stops
    it here, before any work (in the launching process, or in rank 0)."""
    params = load_params()
    started = distributed.setup_stage(params, module, connect.setup)
    if started is None:
        return None
    dev, ranks = started
    weights = init_weights.load(params.model)
    data = weights.normalize(load_prepared(paths.PREPARED_DIR))
    warning = weights.warning(data)
    if warning:
        progress.say(f"warning: {warning}")  # (a rank other than 0 prints nothing)
    return TrainingStage(params, dev, ranks, weights, data, warning)
