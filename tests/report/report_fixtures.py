"""A workflow root with every input of the report stages, built quickly without training anything.

The collection goes through the real `ingest` and `preprocess` stages (one hostile caption, one missing image);
the evaluation outputs (neighbours, alignment, probes, dvclive logs, trials) are small files written here in
the documented schemas, with known values the tests compare the report against.
"""

from __future__ import annotations

import os
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import yaml

from dinoflow import paths
from dinoflow.config import model_names
from dinoflow.data.synthetic import make_tiny_collection
from dinoflow.evaluate.neighbours import neighbours_table
from dinoflow.models.factory import create_encoder, save_encoder
from dinoflow.utils import write_json

HOSTILE_CAPTION = '<script>alert(1)</script> & "quoted" $x^2$'


@contextmanager
def chdir(path: Path):
    old = Path.cwd()
    os.chdir(path)
    try:
        yield
    finally:
        os.chdir(old)


def brute_force_top(emb: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Cosine top-k of every row among the others, by a full similarity matrix and a stable sort."""
    x = emb / np.linalg.norm(emb, axis=1, keepdims=True)
    sim = x @ x.T
    np.fill_diagonal(sim, -np.inf)
    idx = np.argsort(-sim, axis=1, kind="stable")[:, :k]
    return idx, np.take_along_axis(sim, idx, axis=1).astype(np.float32)


def align_values(model_index: int) -> dict:
    base = 0.1 * (model_index + 1) + 0.01234
    return {
        "model": "m",
        "caption": {"n_items": 19, "n_pairs": 171, "spearman": base, "ci_low": None, "ci_high": None,
                    "method": "exact", "mantel_p": 0.005 * (model_index + 1), "mean_query_spearman": base / 2,
                    "mutual_knn": 0.2 + 0.01 * model_index},
        "keywords": {"n_items": 19, "n_pairs": 171, "spearman": base + 0.05, "ci_low": base + 0.01,
                     "ci_high": base + 0.09, "method": "sampled", "mantel_p": 0.01, "mean_query_spearman": base / 3,
                     "mutual_knn": 0.3 - 0.01 * model_index},
    }


def probe_values(model_index: int, classes: dict[str, list[str]]) -> dict:
    out = {}
    for j, (label, cls) in enumerate(classes.items()):
        n = len(cls)
        cm = (np.eye(n, dtype=int) * (2 + model_index) + 1).tolist()
        out[label] = {"n_train": 17, "n_test": 7, "n_classes": n,
                      "knn": {"top1": 0.25 + 0.1 * model_index + 0.01 * j, "top5": 0.9},
                      "linear": {"top1": 0.2 + 0.11 * model_index, "top5": 0.95 - 0.01 * model_index},
                      "confusion_matrix": {"classifier": "linear", "classes": cls, "matrix": cm}}
    return {"model": "m", "labels": out}


def write_dvclive(log_dir: Path, series: dict[str, np.ndarray]) -> None:
    for name, values in series.items():
        tsv = log_dir / "plots" / "metrics" / f"{name}.tsv"
        tsv.parent.mkdir(parents=True, exist_ok=True)
        col = name.split("/")[-1]
        pd.DataFrame({"timestamp": np.arange(len(values)) + 1_700_000_000, "step": np.arange(len(values)),
                      col: values}).to_csv(tsv, sep="\t", index=False)
    write_json(log_dir / "metrics.json", {"train": {k.split("/")[-1]: float(v[-1]) for k, v in series.items()},
                                          "step": len(next(iter(series.values()))) - 1})


def _load_tiny_params():
    """tests/conftest.py's `tiny_params`, loaded by path (a plain `import conftest` could find this file)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("_dinoflow_root_conftest", Path(__file__).resolve().parents[1]
                                                  / "conftest.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.tiny_params


def build_workspace(root: Path) -> dict:
    """Write the collection, run ingest + preprocess, save initial encoders, then the evaluation fixtures."""
    tiny_params = _load_tiny_params()
    coll = make_tiny_collection(root / "collection", n=24, size=64, missing_text_every=6)
    meta = pd.read_csv(coll["metadata"])
    meta.loc[0, "caption"] = HOSTILE_CAPTION
    extra = meta.iloc[[1]].copy()
    extra["id"], extra["path"] = "gone", "no_such_file.png"  # skipped at ingest: missing_file
    pd.concat([meta, extra]).to_csv(coll["metadata"], index=False)
    params = tiny_params(coll)
    params["neighbours"]["grid_query_ids"] = ["img00000"]
    ws = root / "ws"
    ws.mkdir()
    with open(ws / "params.yaml", "w", encoding="utf-8") as fh:
        yaml.safe_dump(params, fh, sort_keys=False)
    with chdir(ws):
        from dinoflow.data import ingest, preprocess

        ingest.main(params)
        preprocess.main(params)
        manifest = pd.read_parquet(paths.MANIFEST)
        ok = manifest[manifest["status"] == "ok"]
        ids = ok["id"].tolist()
        classes = {c: sorted(ok[c].dropna().unique().tolist()) for c in params["collection"]["label_columns"]}
        rng = np.random.default_rng(0)
        for i, m in enumerate(model_names(params)):
            encoder, info = create_encoder(params, m)  # initial weights are enough for attention figures
            save_encoder(encoder, paths.model_weights(m), info)
            emb = rng.normal(size=(len(ids), 8)).astype(np.float32)
            idx, scores = brute_force_top(emb, params["neighbours"]["k"])
            Path(paths.neighbours(m)).parent.mkdir(parents=True, exist_ok=True)
            pq.write_table(neighbours_table(np.asarray(ids, dtype=object), idx, scores), paths.neighbours(m))
            np.save(root / f"emb_{m}.npy", emb)
            write_json(paths.align_metrics(m), align_values(i))
            write_json(paths.probe_metrics(m), probe_values(i, classes))
            if m != "random" and m != "pretrained":
                steps = np.linspace(0, 1, 12)
                series = {"train/loss": 5 - 2 * steps, "train/dino_loss": 4 - steps, "train/lr": steps / 1000}
                if m.startswith("ft_"):
                    series.update({"train/head_loss": 3 - steps * (1 + i / 10),
                                   "train/backbone_grad_norm": 1 + steps * i})
                write_dvclive(Path(paths.train_log_dir(m)), series)
        Path(paths.LR_SEARCH_DIR).mkdir(parents=True, exist_ok=True)
        pd.DataFrame({"number": [0, 1, 2], "value": [4.1, 3.7, np.nan], "params_lr": [1e-4, 1e-3, 1e-2],
                      "state": ["COMPLETE", "COMPLETE", "PRUNED"]}).to_csv(paths.LR_SEARCH_TRIALS, index=False)
        write_json(paths.LR_SEARCH_BEST, {"lr": 1e-3, "value": 3.7})
        write_json("metrics/text.json", {"caption": {"n_items": 19, "n_missing": 5},
                                         "keywords": {"n_items": 19, "n_missing": 5}})
    return params
