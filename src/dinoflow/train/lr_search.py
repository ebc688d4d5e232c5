"""`dinoflow lr-search`: Optuna search of the scratch learning rate (optionally weight decay, teacher temperature),
judged by the quality of the representation, not by the training loss.

A grouped held-out slice of the collection (`lr_search.heldout_images` images, whole groups of `paths.GROUPS`, so
near-duplicates of a held-out image never train) is kept out of every trial's training. Each trial is a short run
of the searched method (`lr_search.method`, default: that of the first scratch model) on the scratch architecture
(`backbone`) on the other images, on the same engine as training (`dinoflow.train.engine`; `lr_search.max_steps`
steps over `lr_search.epochs` epochs); then the trial's evaluated network (`train.evaluate_network`) embeds the held-out slice (CLS) and the criterion is computed there:
- `knn_top1` (when `collection.label_columns` is set): DINO's weighted kNN (`evaluate.probes.knn_scores`, k and T
  of the `probes` section) of the first label column, the held-out slice split by group into references and
  queries (`probes.test_fraction` of the groups are queries), on `similarity_features` rows;
- `rankme` (no label columns): the effective rank (`evaluate.health.rankme`) of the centred held-out embeddings.
Higher is better for both; each comes with a bootstrap 95% interval over the held-out (query) images. The TPE
sampler is seeded. A diverged trial is recorded as FAIL (no value). The loss of the last quarter of the steps is
kept in the table for reference only: the search showed that it rewards KoLeo and large, clipped steps.
Outputs: the trial table (`paths.LR_SEARCH_TRIALS`), the figure (loss curves and the criterion per lr,
`paths.LR_SEARCH_PLOT`) and the best values (`paths.LR_SEARCH_BEST`, read by scratch training).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from dinoflow import paths
from dinoflow.config import lr_search_method, lr_search_model
from dinoflow.errors import DinoflowError
from dinoflow.ssl.methods.base import get_method
from dinoflow.train.config import TrainConfig
from dinoflow.train.engine import RunSpec, make_engine, with_lr
from dinoflow.utils import get_logger, seed_everything, write_json

log = get_logger(__name__)

N_BOOTSTRAP = 200


class Subset:
    """The images at `positions` of `images` (an `ImageStore` or a sequence), with `__len__` and `get(i)`."""

    def __init__(self, images: Any, positions: np.ndarray):
        self.images, self.positions = images, np.asarray(positions, dtype=np.int64)

    def __len__(self) -> int:
        return len(self.positions)

    def get(self, i: int):
        j = int(self.positions[i])
        return self.images.get(j) if hasattr(self.images, "get") else self.images[j]


@dataclass
class HeldOut:
    """The grouped held-out slice: positions (into the collection) of the training images, the held-out images,
    and, for kNN, which held-out rows are references / queries and their labels (class indices)."""

    train: np.ndarray
    heldout: np.ndarray
    criterion: str                       # knn_top1 | rankme
    label_column: str | None = None
    reference: np.ndarray | None = None  # rows of `heldout` used as the kNN memory
    query: np.ndarray | None = None      # rows of `heldout` classified
    labels: np.ndarray | None = None     # class index per `heldout` row (-1: no label)
    n_classes: int = 0


def _take_groups(groups: np.ndarray, candidates: np.ndarray, n_wanted: int, rng: np.random.Generator) -> np.ndarray:
    """Whole groups, in a seeded random order, from `candidates` (positions) until at least n_wanted positions."""
    order = rng.permutation(np.unique(groups[candidates]))
    sizes = pd.Series(groups[candidates]).value_counts()
    chosen, total = [], 0
    for g in order:
        if total >= n_wanted:
            break
        chosen.append(g)
        total += int(sizes[g])
    return candidates[np.isin(groups[candidates], chosen)]


def grouped_heldout(groups: np.ndarray, labels: np.ndarray | None, n_heldout: int, query_fraction: float,
                    seed: int, label_column: str | None = None) -> HeldOut:
    """Split the collection (one group string per image) into training images and a held-out slice of whole groups.

    With `labels` (one string or None per image), only labelled images are held out and the slice is split again by
    group into kNN references and `query_fraction` queries. Raises DinoflowError when the collection is too small
    to leave both a training set and a usable slice.
    """
    groups = np.asarray(groups, dtype=object)
    n = len(groups)
    rng = np.random.default_rng([int(seed), 0x1125])
    everything = np.arange(n)
    if labels is None:
        heldout = _take_groups(groups, everything, n_heldout, rng)
        out = HeldOut(train=np.setdiff1d(everything, heldout), heldout=heldout, criterion="rankme")
    else:
        labels = np.asarray(labels, dtype=object)
        has_label = np.array([v is not None and not (isinstance(v, float) and math.isnan(v)) and str(v) != ""
                              for v in labels])
        # groups are held out whole: a group with any unlabelled image stays out of the candidates' split
        heldout = _take_groups(groups, everything[has_label & ~np.isin(groups, groups[~has_label])], n_heldout, rng)
        query = _take_groups(groups, heldout, int(round(query_fraction * len(heldout))), rng)
        is_query = np.isin(heldout, query)
        classes, y = np.unique(labels[heldout].astype(str), return_inverse=True)
        out = HeldOut(train=np.setdiff1d(everything, heldout), heldout=heldout, criterion="knn_top1",
                      label_column=label_column, reference=np.flatnonzero(~is_query), query=np.flatnonzero(is_query),
                      labels=y, n_classes=len(classes))
        if len(out.query) == 0 or len(out.reference) == 0 or out.n_classes < 2:
            raise DinoflowError(f"lr_search: the held-out slice ({len(heldout)} labelled images of "
                                f"{len(np.unique(groups[heldout]))} groups, label column {label_column!r}) cannot be "
                                "split into kNN references and queries of 2+ classes; raise lr_search.heldout_images")
    if len(out.train) == 0 or len(out.heldout) < 2:
        raise DinoflowError(f"lr_search: {n} images cannot give both training images and a held-out slice of "
                            f"{n_heldout} (lr_search.heldout_images); lower it")
    return out


def _bootstrap(values_fn, n_rows: int, seed: int) -> list[float]:
    """Percentile-bootstrap 95% interval of `values_fn(rows)` over resampled rows."""
    rng = np.random.default_rng([int(seed), 0xB007])
    stats = [values_fn(rng.integers(0, n_rows, n_rows)) for _ in range(N_BOOTSTRAP)]
    lo, hi = np.quantile(stats, [0.025, 0.975])
    return [float(lo), float(hi)]


def criterion_value(x: np.ndarray, split: HeldOut, probes: dict[str, Any], seed: int) -> dict[str, Any]:
    """{"name", "value", "ci95"} of the held-out embeddings `x` (one row per `split.heldout` image).

    knn_top1: top-1 accuracy of the queries (weighted kNN over the references, cosine on similarity_features rows);
    rankme: RankMe of the centred embeddings. Higher is better for both.
    """
    from dinoflow.evaluate.health import rankme
    from dinoflow.evaluate.probes import knn_scores
    from dinoflow.evaluate.vectors import similarity_features

    if not np.isfinite(x).all():
        return {"name": split.criterion, "value": None, "ci95": None}
    if split.criterion == "rankme":
        def rank_of(rows: np.ndarray) -> float:
            sub = x[rows]
            return rankme(sub - sub.mean(axis=0, keepdims=True))

        every = np.arange(len(x))
        return {"name": "rankme", "value": rank_of(every), "ci95": _bootstrap(rank_of, len(x), seed)}
    f = similarity_features(x)
    scores = knn_scores(f[split.reference], split.labels[split.reference], f[split.query], split.n_classes,
                        int(probes["knn_k"]), float(probes["knn_temperature"]))
    correct = (np.argmax(scores, axis=1) == split.labels[split.query]).astype(np.float64)
    return {"name": f"knn_top1/{split.label_column}", "value": float(correct.mean()),
            "ci95": _bootstrap(lambda rows: float(correct[rows].mean()), len(correct), seed)}


def trial_spec(params: dict[str, Any], lr: float, weight_decay: float | None = None,
               teacher_temp: float | None = None) -> RunSpec:
    """The `RunSpec` of one trial: the searched method from scratch, `lr_search.epochs` epochs of at most
    ceil(max_steps / epochs) steps, at the trial's lr (and weight decay / teacher temperature)."""
    s = params["lr_search"]
    method = lr_search_method(params)
    if method is None:
        raise DinoflowError("lr_search.method: not set and no model trains from random weights")
    section = dict((params.get("methods") or {}).get(method) or {})
    if teacher_temp is not None:
        if "teacher_temp" not in {f.name for f in dataclasses.fields(get_method(method).Config)}:
            raise DinoflowError(f"lr_search.search_teacher_temp: method {method!r} has no teacher temperature")
        section["teacher_temp"] = float(teacher_temp)
    epochs, max_steps = int(s["epochs"]), int(s["max_steps"])
    per_epoch = max(1, math.ceil(max_steps / epochs))
    train = TrainConfig.from_params(params)
    train = dataclasses.replace(with_lr(train, lr, weight_decay), epochs=epochs,
                                max_steps_per_epoch=min(per_epoch, train.max_steps_per_epoch or per_epoch))
    return RunSpec(method=method, method_section=section, trainable="all", train=train, finetune=None,
                   seed=int(params["seed"]))


def run_trial(params: dict[str, Any], images: Any, lr: float, weight_decay: float | None = None,
              teacher_temp: float | None = None, report=None) -> tuple[list[float], Any]:
    """One short run of the searched method on the engine (the same `Engine.steps` as training) on `images`;
    `report(step, loss)` is called after each step. Returns (the loss curve, the evaluated backbone: the
    method's exported network, `train.evaluate_network`), or (curve, None) when the run diverged."""
    from dinoflow.models.factory import create_encoder

    spec = trial_spec(params, lr, weight_decay, teacher_temp)
    seed_everything(spec.seed)  # every trial starts from the same weights and sees the same data
    encoder, _ = create_encoder(params, lr_search_model(params))
    engine = make_engine(spec, encoder, images)
    losses: list[float] = []
    steps = engine.steps(0, int(params["lr_search"]["max_steps"]))
    while True:
        try:
            it, values = next(steps)
        except StopIteration:
            return losses, engine.evaluated()[1]
        except DinoflowError:  # diverged: this lr is too high
            losses.append(math.inf)
            if report is not None:
                report(len(losses) - 1, math.inf)
            return losses, None
        losses.append(values["loss/total"])
        if report is not None:
            report(it, values["loss/total"])


def objective_value(losses: list[float]) -> float:
    """Mean loss of the last quarter of the steps (kept in the table for reference; not the objective)."""
    if not losses:
        return math.inf
    tail = losses[-max(1, len(losses) // 4):]
    return float(np.mean(tail)) if all(map(math.isfinite, tail)) else math.inf


def curves_figure(curves: dict[int, dict[str, Any]], criterion: str):
    """Loss per step of every trial (coloured by log lr), and each trial's criterion (95% interval) against its lr."""
    from matplotlib import cm, colors

    from dinoflow.report.figures import new_figure

    fig = new_figure(10.0, 3.8)
    ax, ax2 = fig.subplots(1, 2)
    lrs = [c["lr"] for c in curves.values()] or [1.0]
    norm = colors.LogNorm(min(lrs), max(lrs) * (1.0001 if min(lrs) == max(lrs) else 1.0))
    for number, c in sorted(curves.items()):
        y = np.array(c["losses"], dtype=float)
        colour = cm.viridis(norm(c["lr"]))
        ax.plot(np.arange(len(y)), np.where(np.isfinite(y), y, np.nan), color=colour, lw=1.2,
                ls="-" if c["state"] == "COMPLETE" else "--", label=f"#{number} lr={c['lr']:.2g} {c['state'].lower()}")
        if c["value"] is not None:
            lo, hi = c["ci95"]
            # (a percentile interval of a small sample need not contain the estimate: bars clipped at the point)
            ax2.errorbar([c["lr"]], [c["value"]], yerr=[[max(c["value"] - lo, 0.0)], [max(hi - c["value"], 0.0)]],
                         fmt="o", color=colour, capsize=3)
    ax.set_xlabel("step")
    ax.set_ylabel("training loss")
    ax.set_title("training loss per trial (dashed: diverged)")
    ax.legend(fontsize=6)
    ax2.set_xscale("log")
    ax2.set_xlabel("lr (per 256 images)")
    ax2.set_ylabel(f"{criterion} on the held-out slice")
    ax2.set_title(f"criterion per trial (higher is better; bars: 95% bootstrap)")
    for a in (ax, ax2):
        a.grid(alpha=0.3)
    fig.tight_layout()
    return fig


def read_groups_and_labels(params: dict[str, Any], ids: list[str]) -> tuple[np.ndarray, np.ndarray | None, str | None]:
    """(group per id from `paths.GROUPS`, label per id of the first `collection.label_columns` from the manifest
    or None without label columns, that column's name). Raises DinoflowError naming the file when an id is absent."""
    path = Path(paths.GROUPS)
    if not path.exists():
        raise DinoflowError(f"{path}: missing; the lr search holds out whole groups (run the `groups` stage first)")
    table = pd.read_parquet(path, columns=["id", "group"])
    group_of = dict(zip(table["id"].astype(str), table["group"].astype(str)))
    missing = [i for i in ids if i not in group_of]
    if missing:
        raise DinoflowError(f"{path}: no group for {len(missing)} processed images (first: {missing[0]!r}); "
                            "rerun the `groups` stage")
    groups = np.array([group_of[i] for i in ids], dtype=object)
    columns = list(params["collection"].get("label_columns") or [])
    if not columns:
        return groups, None, None
    column = columns[0]
    manifest = pd.read_parquet(paths.MANIFEST, columns=["id", column])
    label_of = dict(zip(manifest["id"].astype(str), manifest[column]))
    return groups, np.array([label_of.get(i) for i in ids], dtype=object), column


def search(params: dict[str, Any], images: Any, groups: np.ndarray, labels: np.ndarray | None = None,
           label_column: str | None = None) -> dict[str, Any]:
    """The search over `images` (one group, and label or None, per image); writes and returns the best values."""
    import optuna

    from dinoflow.report.figures import save_figure
    from dinoflow.train.drift import cls_embeddings

    s = params["lr_search"]
    lo, hi = (float(v) for v in s["lr_range"])
    if not 0 < lo < hi:
        raise DinoflowError(f"lr_search.lr_range: need 0 < low < high, got {s['lr_range']!r}")
    seed = int(params["seed"])
    split = grouped_heldout(groups, labels, int(s["heldout_images"]), float(params["probes"]["test_fraction"]), seed,
                            label_column)
    train_images = Subset(images, split.train)
    criterion = split.criterion if split.criterion == "rankme" else f"knn_top1/{split.label_column}"
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(direction="maximize", sampler=optuna.samplers.TPESampler(seed=seed))
    curves: dict[int, dict[str, Any]] = {}

    def objective(trial: optuna.Trial) -> float:
        lr = trial.suggest_float("lr", lo, hi, log=True)
        wd = trial.suggest_float("weight_decay", 1e-3, 0.2, log=True) if s.get("search_weight_decay") else None
        temp = trial.suggest_float("teacher_temp", 0.02, 0.1) if s.get("search_teacher_temp") else None
        curve = curves.setdefault(trial.number, {"lr": lr, "losses": [], "state": "RUNNING", "value": None,
                                                 "ci95": None})
        losses, backbone = run_trial(params, train_images, lr, wd, temp, lambda step, loss: curve["losses"].append(loss))
        trial.set_user_attr("loss_last_quarter", objective_value(losses) if backbone is not None else None)
        if backbone is None:
            curve["state"] = "FAIL"
            log.info("trial %d: lr=%.3g diverged", trial.number, lr)
            return float("nan")  # Optuna records the trial as FAIL
        result = criterion_value(cls_embeddings(backbone, images, split.heldout), split, params["probes"], seed)
        if result["value"] is None:
            curve["state"] = "FAIL"
            return float("nan")
        curve.update(state="COMPLETE", value=result["value"], ci95=result["ci95"])
        trial.set_user_attr("ci95_low", result["ci95"][0])
        trial.set_user_attr("ci95_high", result["ci95"][1])
        log.info("trial %d: lr=%.3g -> %s %.4f [%.4f, %.4f]", trial.number, lr, criterion, result["value"],
                 *result["ci95"])
        return result["value"]

    log.info("lr search: %d trials x %d steps, lr in [%g, %g] (TPE seed %d); criterion %s on a held-out slice of "
             "%d images (%d groups), trials train on the other %d", s["n_trials"], s["max_steps"], lo, hi, seed,
             criterion, len(split.heldout), len(np.unique(groups[split.heldout])), len(split.train))
    study.optimize(objective, n_trials=int(s["n_trials"]), show_progress_bar=False)
    complete = [tr for tr in study.trials if tr.state == optuna.trial.TrialState.COMPLETE]
    if not complete:
        raise DinoflowError("lr search: no trial completed (all diverged); lower lr_search.lr_range")
    best_trial = study.best_trial
    best = {k: float(v) for k, v in best_trial.params.items()}
    best.update(criterion=criterion, objective=float(best_trial.value),
                objective_ci95=[best_trial.user_attrs["ci95_low"], best_trial.user_attrs["ci95_high"]],
                higher_is_better=True, trial=int(best_trial.number), n_trials=len(study.trials),
                n_heldout=int(len(split.heldout)), n_train=int(len(split.train)),
                lr_units="per 256 images (scaled by train.batch_size / 256 in training)")
    # trials whose criterion lies inside the best trial's 95% interval: the held-out slice cannot tell them apart
    lo, hi = best["objective_ci95"]
    close = [tr for tr in complete if tr.number != best_trial.number and lo <= float(tr.value) <= hi]
    best["n_indistinguishable"] = len(close)
    close_lrs = ", ".join(format(float(tr.params["lr"]), ".3g") for tr in close)
    best["note"] = None if not close else (
        f"{len(close)} other trial(s) (lr {close_lrs}) score inside the "
        f"best trial's 95% interval [{lo:.4f}, {hi:.4f}]: the criterion cannot tell these learning rates apart; "
        "the best point value is used")
    if close:
        log.warning("lr search: %s", best["note"])
    write_json(paths.LR_SEARCH_BEST, best)
    table = study.trials_dataframe(attrs=("number", "value", "params", "state", "duration", "user_attrs"))
    table["duration"] = table["duration"].dt.total_seconds()
    table = table.rename(columns=lambda c: c.replace("params_", "").replace("user_attrs_", ""))
    table.insert(2, "criterion", criterion)
    Path(paths.LR_SEARCH_TRIALS).parent.mkdir(parents=True, exist_ok=True)
    table.to_csv(paths.LR_SEARCH_TRIALS, index=False)
    save_figure(curves_figure(curves, criterion), paths.LR_SEARCH_PLOT)
    log.info("lr search: best lr %.3g (%s %.4f [%.4f, %.4f]) -> %s; trials -> %s; figure -> %s", best["lr"],
             criterion, best["objective"], *best["objective_ci95"], paths.LR_SEARCH_BEST, paths.LR_SEARCH_TRIALS,
             paths.LR_SEARCH_PLOT)
    return best


def main(params: dict[str, Any]) -> dict[str, Any]:
    from dinoflow.data.store import ImageStore

    store = ImageStore(paths.PROCESSED_DIR)
    ids = [str(i) for i in store.ids]
    groups, labels, column = read_groups_and_labels(params, ids)
    return search(params, store, groups, labels, column)
