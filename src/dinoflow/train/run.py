"""`dinoflow train --model M`: materialise (method: none) or DINO-train (method: dino) one model of the list.

`method: none` saves the initial encoder as it is (seeded random weights or the pretrained weights); `dino` trains
from that initial encoder (`dinoflow.train.dino.train`): from scratch when `init: random`, a partial fine-tune
otherwise. Under torchrun every process runs this; only rank 0 writes files.
"""

from __future__ import annotations

from typing import Any

from dinoflow import paths
from dinoflow.config import model_config
from dinoflow.errors import DinoflowError
from dinoflow.models.factory import create_encoder, save_encoder
from dinoflow.train.distributed import cleanup, init_distributed
from dinoflow.utils import get_logger, seed_everything

log = get_logger(__name__)


def main(params: dict[str, Any], model: str) -> None:
    cfg = model_config(params, model)
    method = cfg.get("method", "none")
    seed_everything(int(params["seed"]))
    encoder, info = create_encoder(params, model)
    if method == "none":
        save_encoder(encoder, paths.model_weights(model), info)
        log.info("%s: initial weights (%s) saved, no training", model, info.get("weights_source"))
        return
    if method != "dino":
        raise DinoflowError(f"models[{model}].method: {method!r} is not none or dino")
    from dinoflow.train.dino import train

    ctx = init_distributed("auto")
    try:
        train(params, model, encoder, info, ctx=ctx)
    finally:
        cleanup()
