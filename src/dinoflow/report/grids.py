"""`dinoflow grids`: retrieval comparison grids, one figure per query image.

Each figure has one row per model of params.yaml: the query image, then its top-k neighbours (the query
itself left out) with their score under the similarity the neighbours stage used (the `similarity` recorded in
the neighbours metadata, e.g. "centred cosine, float64") and caption. Scores are shown with 4 significant digits,
and near 1 as 1 - score, so that two different scores never print the same (`score_text`).
The queries are `neighbours.grid_query_ids` plus
`neighbours.grid_random_queries` ok images drawn with `params.seed`; their ids are written to
`GRID_QUERIES` so that `dinoflow attention` and the report show the same images.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Mapping, Sequence

import numpy as np
import pandas as pd
import pyarrow.parquet as pq

from dinoflow import paths
from dinoflow.config import model_names
from dinoflow.errors import DinoflowError
from dinoflow.report.figures import (hide_axes, image_panel, model_row_title, new_figure, save_figure,
                                     wrap_text)
from dinoflow.utils import get_logger, read_json, write_json

if TYPE_CHECKING:
    from matplotlib.figure import Figure

log = get_logger(__name__)

GRID_QUERIES = paths.GRID_QUERIES  # the chosen query ids, read by attention and the report
NEIGHBOUR_COLUMNS = ("query_id", "rank", "neighbour_id", "score")


# ----------------------------------------------------------------------------------------------- manifest
def read_ok_manifest(manifest_path: str | Path = paths.MANIFEST) -> pd.DataFrame:
    """The ok rows of the manifest (id, caption, keywords), in manifest order, indexed by id."""
    path = Path(manifest_path)
    if not path.exists():
        raise DinoflowError(f"{path}: manifest not found (run `dinoflow ingest` first)")
    df = pd.read_parquet(path)
    missing = {"id", "status"} - set(df.columns)
    if missing:
        raise DinoflowError(f"{path}: manifest lacks column(s) {sorted(missing)}")
    ok = df[df["status"] == "ok"].copy()
    for col in ("caption", "keywords"):
        if col not in ok.columns:
            ok[col] = None
    ok["id"] = ok["id"].astype(str)
    return ok.set_index("id", drop=False)


def caption_of(row: Mapping[str, Any] | pd.Series) -> str:
    """The caption, or the keywords when there is no caption, or a note saying there is no text."""
    cap = row.get("caption")
    if isinstance(cap, str) and cap.strip():
        return cap
    kws = row.get("keywords")
    if kws is not None and not (isinstance(kws, float) and np.isnan(kws)) and len(kws) > 0:
        return "; ".join(str(k) for k in kws)
    return "(no caption)"


# ------------------------------------------------------------------------------------------------ queries
def select_queries(ok_ids: Sequence[str], fixed_ids: Sequence[str], n_random: int, seed: int,
                   param_name: str = "neighbours.grid_query_ids") -> dict[str, list[str]]:
    """Configured ids first (each must be an ok image), then `n_random` other ok ids drawn with `seed`.

    The draw depends only on the seed and the sorted ok ids, so it is the same on every machine.
    """
    ok_set = set(ok_ids)
    fixed: list[str] = []
    for qid in fixed_ids:
        qid = str(qid)
        if qid not in ok_set:
            raise DinoflowError(f"{param_name}: id {qid!r} is not an ok image of the manifest "
                                f"(missing from the collection or skipped at ingest)")
        if qid not in fixed:
            fixed.append(qid)
    if n_random < 0:
        raise DinoflowError(f"neighbours.grid_random_queries: must be >= 0, got {n_random}")
    pool = sorted(ok_set - set(fixed))
    n = min(int(n_random), len(pool))
    rng = np.random.default_rng(seed)
    drawn = [pool[i] for i in sorted(rng.choice(len(pool), size=n, replace=False))] if n else []
    return {"fixed": fixed, "random": drawn, "all": fixed + drawn}


def query_file_name(index: int, query_id: str) -> str:
    """A safe, ordered file name for a query's figure (ids may hold any character)."""
    slug = re.sub(r"[^A-Za-z0-9_.-]+", "_", str(query_id))[:60].strip("._") or "id"
    return f"query_{index:03d}_{slug}.png"


def read_queries(path: str | Path = GRID_QUERIES) -> dict[str, Any]:
    path = Path(path)
    if not path.exists():
        raise DinoflowError(f"{path}: grid queries not found (run `dinoflow grids` first)")
    data = read_json(path)
    if not isinstance(data, dict) or not isinstance(data.get("query_ids"), list):
        raise DinoflowError(f"{path}: expected an object with a 'query_ids' list")
    return data


# ------------------------------------------------------------------------------------------------- neighbours
def read_query_neighbours(path: str | Path, query_ids: Sequence[str], k: int) -> dict[str, list[tuple[str, float]]]:
    """Top-k (neighbour id, score) per query from a neighbours Parquet, by rank, the query itself left out."""
    path = Path(path)
    if not path.exists():
        raise DinoflowError(f"{path}: neighbours file not found (run `dinoflow neighbours` for this model)")
    schema_names = pq.read_schema(path).names
    missing = set(NEIGHBOUR_COLUMNS) - set(schema_names)
    if missing:
        raise DinoflowError(f"{path}: neighbours file lacks column(s) {sorted(missing)}")
    table = pq.read_table(path, columns=list(NEIGHBOUR_COLUMNS),
                          filters=[("query_id", "in", [str(q) for q in query_ids])])
    df = table.to_pandas()
    df["query_id"] = df["query_id"].astype(str)
    df["neighbour_id"] = df["neighbour_id"].astype(str)
    df = df[df["query_id"] != df["neighbour_id"]].sort_values(["query_id", "rank"], kind="stable")
    out: dict[str, list[tuple[str, float]]] = {}
    for qid, part in df.groupby("query_id", sort=False):
        out[qid] = [(n, float(s)) for n, s in zip(part["neighbour_id"][:k], part["score"][:k])]
    return out


def read_neighbours_similarity(path: str | Path) -> str:
    """The similarity a neighbours Parquet was ranked by (its `similarity` metadata, e.g. "centred cosine,
    float64"). Raises DinoflowError when the file lacks it (written before the similarity section existed)."""
    from dinoflow.evaluate.vectors import read_vectors_metadata

    meta = read_vectors_metadata(path)
    if not isinstance(meta.get("similarity"), str):
        raise DinoflowError(f"{path}: the neighbours metadata does not say which similarity ranked them "
                            f"(written by an older dinoflow): re-run `dinoflow neighbours`")
    return meta["similarity"]


def score_text(score: float) -> str:
    """A neighbour's score as the grid prints it: 4 significant digits of the score, or of 1 - score when the
    score is within 1e-3 of 1 (near-duplicates, raw cosines), so scores that differ print differently."""
    if score >= 0.999:
        return f"1−s {1.0 - score:.4g}"
    return f"s {score:.4g}"


def read_model_info(model: str) -> dict[str, Any] | None:
    path = Path(paths.model_info(model))
    return read_json(path) if path.exists() else None


# --------------------------------------------------------------------------------------------------- figure
def grid_figure(query_id: str, rows: Sequence[tuple[str, list[tuple[str, float]]]], k: int,
                get_image: Callable[[str], Any], captions: Mapping[str, str], similarity: str) -> Figure:
    """One row per model: the query, then its neighbours with score (`score_text`: s = the used similarity)
    and caption below each image. `similarity` names it in the title."""
    ncols = 1 + k
    fig = new_figure(1.9 * ncols + 0.8, 2.45 * len(rows) + 0.6)
    axes = fig.subplots(len(rows), ncols, squeeze=False)
    query_img = get_image(query_id)
    for r, (title, neigh) in enumerate(rows):
        ax = axes[r, 0]
        image_panel(ax, query_img, f"query {wrap_text(query_id, 20, 1)}", fontsize=8)
        ax.set_ylabel(title, fontsize=9, rotation=90, parse_math=False)
        for spine in ax.spines.values():  # frame the query so the row reads as query -> neighbours
            spine.set_visible(True)
            spine.set_color("#d62728")
            spine.set_linewidth(2)
        ax.text(0.5, -0.04, wrap_text(captions.get(query_id, ""), 24, 3), transform=ax.transAxes,
                ha="center", va="top", fontsize=6.5, parse_math=False)
        for c in range(1, ncols):
            ax = axes[r, c]
            if c - 1 < len(neigh):
                nid, score = neigh[c - 1]
                image_panel(ax, get_image(nid), f"#{c}  {score_text(score)}", fontsize=8)
                ax.text(0.5, -0.04, wrap_text(captions.get(nid, ""), 24, 3), transform=ax.transAxes,
                        ha="center", va="top", fontsize=6.5, parse_math=False)
            else:
                hide_axes(ax)
                if c == 1:
                    ax.text(0.05, 0.5, "no neighbours", transform=ax.transAxes, fontsize=8)
    height = fig.get_figheight()
    fig.suptitle(f"nearest neighbours of {wrap_text(query_id, 60, 1)} (s = {similarity}, top {k})", fontsize=11,
                 parse_math=False, y=1 - 0.1 / height, va="top")
    fig.subplots_adjust(left=0.07, right=0.99, top=1 - 0.6 / height, bottom=0.35 / height, wspace=0.08, hspace=0.42)
    return fig


def main(params: dict[str, Any]) -> None:
    from dinoflow.data.store import ImageStore

    cfg = params["neighbours"]
    k = int(cfg.get("grid_k", 5))
    if k < 1:
        raise DinoflowError(f"neighbours.grid_k: must be >= 1, got {k}")
    ok = read_ok_manifest(paths.MANIFEST)
    queries = select_queries(list(ok.index), cfg.get("grid_query_ids") or [], int(cfg.get("grid_random_queries", 0)),
                             int(params["seed"]))
    models = model_names(params)
    per_model = {m: read_query_neighbours(paths.neighbours(m), queries["all"], k) for m in models}
    similarity = " / ".join(dict.fromkeys(read_neighbours_similarity(paths.neighbours(m)) for m in models))
    infos = {m: read_model_info(m) for m in models}
    captions = {i: caption_of(row) for i, row in ok.iterrows()}
    store = ImageStore(paths.PROCESSED_DIR)

    out_dir = Path(paths.GRIDS_DIR)
    out_dir.mkdir(parents=True, exist_ok=True)
    for old in out_dir.glob("query_*.png"):  # a previous run's queries must not linger in the report
        old.unlink()
    files = []
    from tqdm import tqdm

    for i, qid in enumerate(tqdm(queries["all"], desc="grids", unit="query")):
        rows = [(model_row_title(m, infos[m]), per_model[m].get(qid, [])) for m in models]
        fig = grid_figure(qid, rows, k, store.get_by_id, captions, similarity)
        name = query_file_name(i, qid)
        save_figure(fig, out_dir / name)
        files.append(name)
    write_json(GRID_QUERIES, {"query_ids": queries["all"], "fixed": queries["fixed"], "random": queries["random"],
                              "seed": int(params["seed"]), "k": k, "models": models, "files": files,
                              "similarity": similarity})
    log.info("wrote %d retrieval grids (%d models, top %d) to %s", len(files), len(models), k, out_dir)
