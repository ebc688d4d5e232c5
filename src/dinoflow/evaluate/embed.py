"""`dinoflow embed --model M`: CLS and mean-patch embeddings of every `ok` image, to `paths.embeddings(M)`.

Parquet: `id` and fixed-size float32 list columns `cls`, `patch_mean`; schema metadata (JSON under `dinoflow`):
model name, arch, weights source, stand-in flag and label, params hash. Images come from the processed store
(`ImageStore`) in manifest order; the eval transform is the model's timm data_config (`data.transforms`): decode
(torchvision.io), resize and centre crop in DataLoader workers on uint8 (`embed.num_workers`), normalisation on
the device per batch. No grad; on CUDA bf16 autocast, batches of at least 256, pinned memory and non-blocking
copies. `benchmarks/bench_embed.py` checks the pipeline against the bare forward. `read_embeddings` is the reader
every later stage uses.
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from dinoflow import paths
from dinoflow.config import model_config, params_hash
from dinoflow.data.transforms import EvalTransform, Normalize, decode_rgb
from dinoflow.errors import DinoflowError
from dinoflow.evaluate.vectors import read_vectors, read_vectors_metadata, write_vectors
from dinoflow.utils import get_logger, resolve_device, seed_everything

log = get_logger(__name__)

EMBED_COLUMNS = ("cls", "patch_mean")
GPU_MIN_BATCH = 256


class EncodedImages(Dataset):
    """Item i -> (transform(uint8 RGB tensor of the store's image at positions[i]), i).

    Decodes the stored bytes with `decode_rgb` (torchvision.io) rather than through `ImageStore.get`'s PIL
    image: on a few CPU cores decoding is the data pipeline's main cost, and this halves it.
    """

    def __init__(self, store: Any, positions: list[int], transform: Any):
        self.store, self.positions, self.transform = store, list(positions), transform

    def __len__(self) -> int:
        return len(self.positions)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        return self.transform(decode_rgb(self.store.get_bytes(self.positions[i]))), i


def read_embeddings(path: str, column: str = "cls") -> tuple[np.ndarray, np.ndarray]:
    """(ids, (N, D) float32) of one embedding column of an embeddings Parquet file."""
    return read_vectors(path, column)


def read_embeddings_metadata(path: str) -> dict[str, Any]:
    return read_vectors_metadata(path)


def ok_ids(manifest: str = paths.MANIFEST) -> list[str]:
    """Ids of the `ok` rows of the manifest, in manifest order."""
    if not os.path.exists(manifest):
        raise DinoflowError(f"{manifest}: manifest not found (run `dinoflow ingest` first)")
    df = pd.read_parquet(manifest, columns=["id", "status"])
    return df.loc[df["status"] == "ok", "id"].astype(str).tolist()


def default_workers(n_images: int, batch_size: int, device: torch.device) -> int:
    """DataLoader workers: none for a few batches (process start-up costs more), else all cores but one."""
    if n_images <= 4 * batch_size:
        return 0
    cores = os.cpu_count() or 1
    return max(1, min(cores - 1, 16 if device.type == "cuda" else 4))


def resolve_workers(value: Any, n_images: int, batch_size: int, device: torch.device) -> int:
    """`embed.num_workers`: "auto" (or absent/None) -> `default_workers`, else a non-negative integer."""
    if value is None or value == "auto":
        return default_workers(n_images, batch_size, device)
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise DinoflowError(f"embed.num_workers: must be 'auto' or an integer >= 0, got {value!r}")
    return value


@torch.no_grad()
def embed_dataset(encoder: torch.nn.Module, dataset: Dataset, normalize: Normalize, batch_size: int,
                  device: torch.device, num_workers: int = 0, amp: bool | None = None,
                  progress: bool = True) -> dict[str, np.ndarray]:
    """Run `encoder.embed` over a dataset of (uint8 image tensor, index); float32 arrays in dataset order."""
    amp = device.type == "cuda" if amp is None else amp
    encoder = encoder.to(device).eval()
    normalize = normalize.to(device)
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=num_workers,
                        pin_memory=device.type == "cuda", persistent_workers=False,
                        prefetch_factor=4 if num_workers > 0 else None)
    chunks: dict[str, list[np.ndarray]] = {c: [] for c in EMBED_COLUMNS}
    for images, _ in tqdm(loader, desc="embed", unit="batch", disable=not progress):
        x = normalize(images.to(device, non_blocking=True))
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
            out = encoder.embed(x)
        for c in EMBED_COLUMNS:
            chunks[c].append(out[c].float().cpu().numpy())
    if not chunks["cls"]:
        raise DinoflowError("embed: no images to embed")
    return {c: np.concatenate(v).astype(np.float32, copy=False) for c, v in chunks.items()}


def main(params: dict[str, Any], model: str) -> None:
    from dinoflow.data.store import ImageStore
    from dinoflow.models.factory import load_encoder

    seed_everything(int(params["seed"]))
    cfg = params["embed"]
    device = resolve_device(cfg.get("device", "auto"))
    ids = ok_ids()
    store = ImageStore(paths.PROCESSED_DIR)
    stored = set(store.ids)
    missing = [i for i in ids if i not in stored]
    if missing:
        raise DinoflowError(f"{paths.PROCESSED_INDEX}: {len(missing)} ok images of {paths.MANIFEST} are not "
                            f"processed (first: {missing[0]!r}); rerun `dinoflow preprocess`")
    positions = [store.position(i) for i in ids]
    encoder = load_encoder(params, model)
    data_config = encoder.data_config
    dataset = EncodedImages(store, positions, EvalTransform(data_config))
    batch_size = int(cfg["batch_size"])
    if device.type == "cuda" and batch_size < GPU_MIN_BATCH:
        log.info("embed.batch_size=%d raised to %d on CUDA (inference only: large batches keep the GPU busy)",
                 batch_size, GPU_MIN_BATCH)
        batch_size = GPU_MIN_BATCH
    workers = resolve_workers(cfg.get("num_workers", "auto"), len(ids), batch_size, device)
    log.info("%s: embedding %d images on %s (batch %d, %d workers, input %s)", model, len(ids), device,
             batch_size, workers, data_config["input_size"])
    arrays = embed_dataset(encoder, dataset, Normalize(data_config), batch_size, device, workers)
    info = getattr(encoder, "info", {}) or {}
    meta = {"model": model, "arch": info.get("arch"), "weights_source": info.get("weights_source"),
            "stand_in": bool(info.get("stand_in", False)), "stand_in_label": info.get("stand_in_label", ""),
            "model_params_hash": info.get("params_hash"),
            # device and workers do not change the vectors (up to float rounding), so they stay out of the hash
            "params_hash": params_hash({"model": model_config(params, model), "model_info": info,
                                        "embed": {k: v for k, v in cfg.items()
                                                  if k not in ("device", "num_workers")}}),
            "input_size": list(data_config["input_size"]), "mean": list(data_config["mean"]),
            "std": list(data_config["std"]), "interpolation": data_config.get("interpolation"),
            "device": device.type, "bf16": device.type == "cuda", "n_images": len(ids)}
    out = paths.embeddings(model)
    write_vectors(out, ids, arrays, meta)
    log.info("%s: %d x %d embeddings (cls, patch_mean) -> %s", model, len(ids), arrays["cls"].shape[1], out)
