"""`dinoflow attention`: where each model looks, for the grid's query images (one figure per query).

One row per model. A ViT row shows the last layer's CLS-to-patch attention of every head and their mean,
bilinearly upsampled and overlaid on the image (as in the DINO papers). A CNN has no attention: its row shows
the channel L2 norm of the last feature map and says so in its title. The maps themselves come from
`dinoflow.models.attention` (hook-based, correct with timm's fused attention).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping, Sequence

import numpy as np

from dinoflow import paths
from dinoflow.config import model_names
from dinoflow.errors import DinoflowError
from dinoflow.report.figures import hide_axes, image_panel, model_row_title, new_figure, save_figure, wrap_text
from dinoflow.report.grids import query_file_name, read_model_info, read_ok_manifest, select_queries
from dinoflow.utils import get_logger, seed_everything, write_json

if TYPE_CHECKING:
    import torch

log = get_logger(__name__)

SALIENCY_TITLE = "saliency (feature L2 norm), not attention"
OVERLAY_ALPHA = 0.55


def attention_query_ids(grid_queries: Sequence[str], extra: Sequence[str], ok_ids: Sequence[str]) -> list[str]:
    """The grid's queries then `attention.query_ids` (each must be an ok image), without repeats."""
    ok_set = set(ok_ids)
    out = list(dict.fromkeys(str(q) for q in grid_queries))
    for qid in extra:
        qid = str(qid)
        if qid not in ok_set:
            raise DinoflowError(f"attention.query_ids: id {qid!r} is not an ok image of the manifest")
        if qid not in out:
            out.append(qid)
    return out


def model_input(image, encoder) -> torch.Tensor:
    """(1, 3, H, W): the image as `dinoflow embed` feeds it to the model (the same eval transform). Stored
    images are square, so the centre crop keeps the whole image and the maps line up with it."""
    from dinoflow.data.transforms import eval_transform

    return eval_transform(encoder.data_config)(image).unsqueeze(0)


def upsample(maps: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Bilinear upsampling of (P, h, w) maps to (P, H, W)."""
    import torch
    import torch.nn.functional as F

    t = torch.as_tensor(np.asarray(maps, dtype=np.float32))[None]
    return F.interpolate(t, size=size, mode="bilinear", align_corners=False)[0].numpy()


def normalise(m: np.ndarray) -> np.ndarray | None:
    """Min-max to [0, 1] per map so every head uses the full colour range; None for a flat map (e.g. a CNN
    whose last feature map is 1x1 at this input size), where stretching would only show rounding noise."""
    lo, hi = float(m.min()), float(m.max())
    if hi - lo <= 1e-6 * max(abs(hi), abs(lo), 1e-12):
        return None
    return (m - lo) / (hi - lo)


def model_maps(encoder, x, display_size: tuple[int, int]) -> dict[str, Any]:
    """Maps of one model for one input batch of size 1, upsampled to `display_size`.

    Returns {"kind": "attention" | "saliency", "maps": (P, H, W) array, "titles": [...]}: for a ViT one map per
    head then their mean, for a CNN the single saliency map.
    """
    import torch

    from dinoflow.models.attention import cls_attention, feature_saliency, heads_to_grid

    with torch.no_grad():
        if encoder.is_vit:
            attn = cls_attention(encoder, x)  # (1, heads, N_patches)
            grids = heads_to_grid(attn, encoder, x.shape[-2], x.shape[-1])[0].float().cpu().numpy()
            grids = np.concatenate([grids, grids.mean(axis=0, keepdims=True)], axis=0)
            titles = [f"head {h + 1}" for h in range(grids.shape[0] - 1)] + ["mean of heads"]
            return {"kind": "attention", "maps": upsample(grids, display_size), "titles": titles}
        sal = feature_saliency(encoder, x)[0].float().cpu().numpy()  # (h, w)
        return {"kind": "saliency", "maps": upsample(sal[None], display_size), "titles": [SALIENCY_TITLE]}


def attention_figure(query_id: str, image, caption: str, rows: Sequence[tuple[str, Mapping[str, Any]]]):
    """One row per model: the image, then each map overlaid on it (jet colour map, alpha blend)."""
    img = np.asarray(image.convert("RGB"))
    ncols = 1 + max(len(r["maps"]) for _, r in rows)
    fig = new_figure(1.9 * ncols + 0.8, 2.2 * len(rows) + 0.7)
    axes = fig.subplots(len(rows), ncols, squeeze=False)
    for r, (title, res) in enumerate(rows):
        image_panel(axes[r, 0], img, "image", fontsize=8)
        axes[r, 0].set_ylabel(title, fontsize=9, parse_math=False)
        for c in range(1, ncols):
            ax = axes[r, c]
            if c - 1 >= len(res["maps"]):
                ax.set_visible(False)
                continue
            ax.imshow(img)
            heat = normalise(res["maps"][c - 1])
            label = res["titles"][c - 1]
            if heat is None:
                label += " (flat map)"
            else:
                ax.imshow(heat, cmap="jet", alpha=OVERLAY_ALPHA, vmin=0, vmax=1)
            hide_axes(ax)
            ax.set_title(wrap_text(label, 22, 3), fontsize=7.5 if res["kind"] == "saliency" else 8,
                         color="#b00000" if res["kind"] == "saliency" else "black", parse_math=False)
    fig.suptitle(f"{wrap_text(query_id, 60, 1)}: {wrap_text(caption, 80, 1)}\n"
                 "ViT rows: last-layer CLS→patch attention per head; CNN rows: feature-norm saliency",
                 fontsize=10, parse_math=False, y=1 - 0.1 / fig.get_figheight(), va="top")
    fig.subplots_adjust(left=0.07, right=0.99, top=1 - 0.85 / fig.get_figheight(), bottom=0.02,
                        wspace=0.06, hspace=0.35)
    return fig


def main(params: dict[str, Any]) -> None:
    from tqdm import tqdm

    from dinoflow.data.store import ImageStore
    from dinoflow.models.factory import load_encoder
    from dinoflow.report.grids import caption_of

    seed_everything(int(params["seed"]))
    ok = read_ok_manifest(paths.MANIFEST)
    # The grid's draw is recomputed (same function, same seed) rather than read from grids/queries.json, so
    # this stage depends only on the manifest and params and can run before or beside `dinoflow grids`.
    cfg = params["neighbours"]
    grid = select_queries(list(ok.index), cfg.get("grid_query_ids") or [], int(cfg.get("grid_random_queries", 0)),
                          int(params["seed"]))
    query_ids = attention_query_ids(grid["all"], (params.get("attention") or {}).get("query_ids") or [],
                                    list(ok.index))
    store = ImageStore(paths.PROCESSED_DIR)
    images = {q: store.get_by_id(q).convert("RGB") for q in query_ids}

    models = model_names(params)
    results: dict[str, dict[str, dict[str, Any]]] = {q: {} for q in query_ids}
    titles = {}
    for m in models:
        encoder = load_encoder(params, m).eval()
        titles[m] = model_row_title(m, getattr(encoder, "info", None) or read_model_info(m))
        for q in tqdm(query_ids, desc=f"attention {m}", unit="image"):
            img = images[q]
            results[q][m] = model_maps(encoder, model_input(img, encoder), (img.height, img.width))
        del encoder

    out_dir = Path(paths.ATTENTION_DIR)
    out_dir.mkdir(parents=True, exist_ok=True)
    for old in out_dir.glob("query_*.png"):
        old.unlink()
    for i, q in enumerate(query_ids):
        rows = [(titles[m], results[q][m]) for m in models]
        fig = attention_figure(q, images[q], caption_of(ok.loc[q]), rows)
        save_figure(fig, out_dir / query_file_name(i, q))
    write_json(out_dir / "queries.json", {"query_ids": query_ids, "models": models,
                                          "files": [query_file_name(i, q) for i, q in enumerate(query_ids)]})
    log.info("wrote %d attention figures (%d models) to %s", len(query_ids), len(models), out_dir)
