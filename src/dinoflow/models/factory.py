"""Build, save and load the encoders of the models listed in params.yaml.

`create_encoder(params, name)` gives a model its initial weights (`init` of its `models` entry):
`random` -> seeded random weights of `backbone`; `pretrained` -> the weights of `pretrained`;
the name of another model -> that model's saved weights (`paths.model_weights`).
Every model is saved as `models/<name>/weights.safetensors` + `models/<name>/info.json`.
Weights are checked for NaN / infinite values (`dinoflow.checks.require_finite`) when loaded from any source and
before they are saved (the end of training): a diverged model stops there, naming the model, file and tensors.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from dinoflow import paths
from dinoflow.checks import require_finite
from dinoflow.config import model_config, model_names, params_hash
from dinoflow.errors import DinoflowError
from dinoflow.models.encoder import Encoder
from dinoflow.models.weights import PACKAGE_ARCH, STAND_IN_LABEL, load_pretrained
from dinoflow.utils import get_logger, read_json, write_json

log = get_logger(__name__)


def _stand_in_label(pretrained: dict[str, Any]) -> str:
    if not pretrained.get("stand_in"):
        return ""
    if pretrained.get("source") == "package" and pretrained.get("arch") == PACKAGE_ARCH:
        return STAND_IN_LABEL
    return f"{pretrained.get('arch')} ({pretrained.get('source')} weights) — stand-in for DINOv2"


def random_timm_kwargs(backbone: dict[str, Any]) -> tuple[dict[str, Any], float | None]:
    """(timm kwargs, init_values) of the random `backbone`: `backbone.kwargs` plus its LayerScale init.

    `backbone.init_values` (ViTs): null = no LayerScale (the residual branches start at full strength),
    a number = LayerScale gammas start at that value (timm's DINOv2 ViTs default to 1e-5, which makes every
    image's random CLS embedding nearly the same). timm drops kwargs that are None, so "no LayerScale" is
    passed as 0.0, which its ViT blocks treat as off (`LayerScale(...) if init_values else nn.Identity()`).
    Raises DinoflowError when `backbone.kwargs` also sets init_values (one fact in one place).
    """
    kwargs = dict(backbone.get("kwargs") or {})
    if "init_values" in kwargs:
        raise DinoflowError("backbone.kwargs.init_values: set the LayerScale init with backbone.init_values "
                            "(null = no LayerScale), not in kwargs")
    init_values = backbone["init_values"]
    kwargs["init_values"] = 0.0 if init_values is None else float(init_values)
    return kwargs, None if init_values is None else float(init_values)


def check_layer_scale(encoder: Encoder, init_values: float | None) -> None:
    """Verify the built random backbone has the LayerScale that `backbone.init_values` asked for."""
    from timm.layers import LayerScale

    scales = [m for m in encoder.modules() if isinstance(m, LayerScale)]
    if init_values is None and scales:
        raise DinoflowError(f"backbone.init_values: null (no LayerScale) but timm built {encoder.arch} with "
                            f"{len(scales)} LayerScale layers; set a number instead")
    if init_values is not None and not scales:
        raise DinoflowError(f"backbone.init_values: {init_values} but {encoder.arch} has no LayerScale; use null")


def create_encoder(params: dict[str, Any], model_name: str) -> tuple[Encoder, dict[str, Any]]:
    """The encoder of `model_name` with its initial weights, and its info dict (see docs/architecture.md).

    The trainable parameters are set from the model's `trainable` spec (none / all / lastK).
    """
    cfg = model_config(params, model_name)
    init = cfg["init"]
    info: dict[str, Any] = {"name": model_name, "init": init, "method": cfg.get("method", "none"),
                            "trainable": cfg.get("trainable", "none")}
    init_values = None  # LayerScale init: only a random ViT has one to report (pretrained weights bring theirs)
    if init == "random":
        bb = params["backbone"]
        kwargs, init_values = random_timm_kwargs(bb)
        # fork_rng: the same seed gives the same weights whatever ran before, without touching global RNG state.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(int(params["seed"]))
            try:
                encoder = Encoder(bb["arch"], bb.get("img_size"), kwargs)
            except DinoflowError as exc:
                if init_values is not None or "init_values" not in str(exc):
                    raise
                # a backbone without LayerScale (e.g. a CNN) does not take the argument: null means nothing to set
                kwargs.pop("init_values")
                torch.manual_seed(int(params["seed"]))
                encoder = Encoder(bb["arch"], bb.get("img_size"), kwargs)
        check_layer_scale(encoder, init_values)
        info.update(arch=bb["arch"], img_size=bb.get("img_size"), timm_kwargs=kwargs,
                    weights_source=f"random (seed {params['seed']})", stand_in=False, stand_in_label="",
                    params_hash=params_hash({"seed": params["seed"], "backbone": bb, "model": cfg}))
    elif init == "pretrained":
        pt = params["pretrained"]
        encoder = Encoder(pt["arch"], pt.get("img_size"), pt.get("kwargs") or {})
        try:
            source = load_pretrained(encoder, pt)
        except DinoflowError as exc:
            raise DinoflowError(f"model {model_name}: {exc}") from exc
        info.update(arch=pt["arch"], img_size=pt.get("img_size"), timm_kwargs=dict(pt.get("kwargs") or {}),
                    weights_source=source, stand_in=bool(pt.get("stand_in")), stand_in_label=_stand_in_label(pt),
                    params_hash=params_hash({"pretrained": pt, "model": cfg}))
    elif init in model_names(params) and init != model_name:
        encoder = load_encoder(params, init)
        parent = encoder.info
        info.update(arch=parent["arch"], img_size=parent.get("img_size"), timm_kwargs=parent.get("timm_kwargs", {}),
                    weights_source=f"model:{init} ({paths.model_weights(init)})",
                    stand_in=parent.get("stand_in", False), stand_in_label=parent.get("stand_in_label", ""),
                    params_hash=params_hash({"parent": parent.get("params_hash"), "model": cfg}))
    else:
        raise DinoflowError(f"models[{model_name}].init: {init!r} is not random, pretrained or the name of "
                            f"another model ({', '.join(n for n in model_names(params) if n != model_name)})")
    encoder.set_trainable(info["trainable"])
    # Contract 2 of docs/architecture.md: the train stage fills evaluated_network, collapse and drift for
    # trained models; untrained ones keep these nulls.
    info.update(init_values=init_values if encoder.is_vit else None, evaluated_network=None,
                **encoder.parameter_counts(), collapse=None, drift=None)
    encoder.info = info
    log.info("model %s: %s %s", model_name, info["arch"], info["weights_source"])
    return encoder, info


def save_encoder(encoder: Encoder, path: str | Path, info: dict[str, Any]) -> None:
    """Weights as safetensors at `path` (info also in its metadata) and `info.json` in the same folder
    (`paths.model_info(name)` when `path` is `paths.model_weights(name)`).

    Raises: DinoflowError, before anything is written, when a tensor holds NaN / infinite values.
    """
    path = Path(path)
    tensors = {k: v.detach().cpu().contiguous() for k, v in encoder.state_dict().items()}
    require_finite(tensors, f"model {info.get('name')}: weights to be saved to {path}",
                   "not saved: training diverged (lower train.lr, check the loss curves) or the initial weights "
                   "were already bad")
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path), metadata={"info": json.dumps(info, sort_keys=True, default=str)})
    write_json(path.parent / "info.json", info)
    log.info("saved %s weights to %s", info.get("name"), path)


def encoder_from_files(weights: str | Path, info_path: str | Path) -> Encoder:
    """Rebuild the architecture recorded in `info_path` and load `weights` strictly.

    Raises: DinoflowError when a file is missing, a tensor holds NaN / infinite values, or the weights do not fit
    the recorded architecture.
    """
    weights, info_path = Path(weights), Path(info_path)
    for p in (weights, info_path):
        if not p.is_file():
            raise DinoflowError(f"{p}: missing (run the model's training rule first)")
    info = read_json(info_path)
    encoder = Encoder(info["arch"], info.get("img_size"), info.get("timm_kwargs") or {})
    state = load_file(str(weights))
    require_finite(state, f"model {info.get('name')}: {weights}",
                   "re-run the model's training rule (delete the file first)")
    try:
        encoder.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise DinoflowError(f"{weights}: does not match the architecture in {info_path}: {exc}") from exc
    encoder.info = info
    return encoder


def load_encoder(params: dict[str, Any], model_name: str) -> Encoder:
    """The saved encoder of `model_name` (`paths.model_weights` + `paths.model_info`), info in `.info`."""
    model_config(params, model_name)  # unknown names fail with the list of known ones
    return encoder_from_files(paths.model_weights(model_name), paths.model_info(model_name))
