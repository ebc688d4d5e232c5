"""`dinoflow train --model M`: materialise (method: none) or train (any registered method) one model of the list.

`method: none` saves the initial encoder as it is (seeded random weights or the pretrained weights). Any other
method (`dinoflow.ssl.methods.available_methods()`) trains from that initial encoder on the engine
(`dinoflow.train.engine`): from scratch when `init: random` (lr from the lr search when
`dinoflow.config.uses_lr_search` says so), a partial fine-tune otherwise (`trainable: lastK`, head warm-up,
separate head / backbone lrs from `finetune`). The parameters are parsed once, here, into a `RunSpec`.
Under torchrun every process runs this; only rank 0 writes files.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

from dinoflow import paths
from dinoflow.config import model_config, params_hash, uses_lr_search
from dinoflow.errors import DinoflowError
from dinoflow.models.factory import create_encoder, save_encoder
from dinoflow.ssl.methods.base import get_method, parse_config
from dinoflow.train.config import FinetuneConfig, TrainConfig
from dinoflow.train.distributed import DistContext, cleanup, init_distributed
from dinoflow.train.engine import RunSpec, fit, make_engine, with_lr
from dinoflow.utils import get_logger, read_json, seed_everything

log = get_logger(__name__)


def lr_from_search(params: dict[str, Any], model_name: str) -> dict[str, float]:
    """The lr search's best values (lr; weight decay, teacher temperature when searched) for a model that uses the search; {} otherwise."""
    if not uses_lr_search(params, model_name):
        return {}
    path = Path(paths.LR_SEARCH_BEST)
    if not path.exists():
        raise DinoflowError(f"{path}: missing; model {model_name!r} takes its lr from the search "
                            "(run `dinoflow lr-search` first, or set lr_from_search: false on the model)")
    best = read_json(path)
    if "lr" not in best:
        raise DinoflowError(f"{path}: no 'lr' entry (rerun `dinoflow lr-search`)")
    return {k: float(best[k]) for k in ("lr", "weight_decay", "teacher_temp") if k in best}


def run_spec(params: dict[str, Any], model_name: str, overrides: dict[str, float] | None = None) -> RunSpec:
    """The typed description of one model's training (validates the method and its `methods.<name>` section)."""
    cfg = model_config(params, model_name)
    method = cfg["method"]
    overrides = dict(overrides or {})
    section = dict((params.get("methods") or {}).get(method) or {})
    if "teacher_temp" in overrides:  # searched with the method (lr_search.search_teacher_temp)
        section["teacher_temp"] = overrides.pop("teacher_temp")
    parse_config(get_method(method), section)  # errors now, naming methods.<name>.<key>, not mid-run
    train = with_lr(TrainConfig.from_params(params), **overrides)
    finetune = FinetuneConfig.from_params(params) if cfg["init"] != "random" else None
    return RunSpec(method=method, method_section=dict(section), trainable=cfg["trainable"], train=train,
                   finetune=finetune, seed=int(params["seed"]))


def train_model(params: dict[str, Any], model_name: str, encoder, info: dict[str, Any], images: Any = None,
                ctx: DistContext | None = None):
    """Train ``encoder`` as model ``model_name`` wants (resuming from ``paths.train_state`` when it exists).

    Returns the evaluated backbone (``train.evaluate_network``) after saving it to ``paths.model_weights`` with
    info.json holding the evaluated network, the collapse verdict and the drift from the initial weights (rank 0).
    ``images``: anything with ``__len__`` and ``get(i)`` (default: the processed `ImageStore`). Raises DinoflowError
    when the loss diverges or (``train.on_collapse: fail``) the verdict is a collapse.
    """
    from dinoflow.data.store import ImageStore

    ctx = ctx or init_distributed("auto")
    overrides = lr_from_search(params, model_name)
    spec = run_spec(params, model_name, overrides)
    images = images if images is not None else ImageStore(paths.PROCESSED_DIR)
    initial = copy.deepcopy(encoder).eval()  # the reference of the drift measure
    engine = make_engine(spec, encoder, images, ctx)
    run_hash = params_hash({"spec": spec, "init": info.get("params_hash"), "n_images": len(images),
                            "world_size": ctx.world_size})
    return fit(engine, model_name, info, run_hash, state_path=paths.train_state(model_name),
               log_dir=paths.train_log_dir(model_name), weights_path=paths.model_weights(model_name),
               extra_info={"lr_overrides": overrides}, initial=initial)


def main(params: dict[str, Any], model: str) -> None:
    cfg = model_config(params, model)
    method = cfg["method"]
    seed_everything(int(params["seed"]))
    if method != "none":
        get_method(method)  # an unknown method fails before any work, with the list of known ones
    encoder, info = create_encoder(params, model)
    if method == "none":
        save_encoder(encoder, paths.model_weights(model), info)
        log.info("%s: initial weights (%s) saved, no training", model, info.get("weights_source"))
        return
    ctx = init_distributed("auto")
    try:
        train_model(params, model, encoder, info, ctx=ctx)
    finally:
        cleanup()
