"""`dinoflow lr-search`: Optuna search of the scratch learning rate (optionally weight decay, teacher temperature).

Each trial is a short run of the searched method (`lr_search.method`) on the scratch architecture (`backbone`) on
the same engine as training (`dinoflow.train.engine`), `lr_search.max_steps` steps over `lr_search.epochs` epochs. The TPE sampler is seeded; a MedianPruner
stops trials whose running loss is worse than the median of earlier trials at the same step. The objective is the
mean loss of the last quarter of a trial's steps. Outputs: the trial table (`paths.LR_SEARCH_TRIALS`), the loss
curves per trial (`paths.LR_SEARCH_PLOT`) and the best values (`paths.LR_SEARCH_BEST`, read by scratch training).
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from typing import Any

import numpy as np

from dinoflow import paths
from dinoflow.config import lr_search_method
from dinoflow.errors import DinoflowError
from dinoflow.ssl.methods.base import get_method
from dinoflow.train.config import TrainConfig
from dinoflow.train.engine import RunSpec, make_engine, with_lr
from dinoflow.utils import get_logger, seed_everything, write_json

log = get_logger(__name__)


def _scratch_model(params: dict[str, Any]) -> str:
    """A model of the list trained from random weights with the searched method (its entry gives `trainable`)."""
    method = lr_search_method(params)
    for m in params["models"]:
        if m["init"] == "random" and m["method"] == method:
            return m["name"]
    for m in params["models"]:
        if m["init"] == "random":
            return m["name"]
    raise DinoflowError("models: the lr search needs a model with init: random (its architecture is `backbone`)")


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
              teacher_temp: float | None = None, report=None) -> list[float]:
    """One short run on the engine; `report(step, loss)` is called after each step (Optuna pruning). Returns the
    loss curve (ending with inf when the run diverged)."""
    from dinoflow.models.factory import create_encoder

    spec = trial_spec(params, lr, weight_decay, teacher_temp)
    seed_everything(spec.seed)  # every trial starts from the same weights and sees the same data
    encoder, _ = create_encoder(params, _scratch_model(params))
    engine = make_engine(spec, encoder, images)
    losses: list[float] = []
    steps = engine.steps(0, int(params["lr_search"]["max_steps"]))
    while True:
        try:
            it, values = next(steps)
            loss = values["loss/total"]
        except StopIteration:
            return losses
        except DinoflowError:  # diverged: this lr is too high; tell Optuna with an infinite loss
            it, loss = len(losses), math.inf
        losses.append(loss)
        if report is not None:
            report(it, loss)
        if not math.isfinite(loss):
            return losses


def objective_value(losses: list[float]) -> float:
    """Mean loss of the last quarter of the steps (less noisy than the last step alone)."""
    if not losses:
        return math.inf
    tail = losses[-max(1, len(losses) // 4):]
    return float(np.mean(tail)) if all(map(math.isfinite, tail)) else math.inf


def curves_figure(curves: dict[int, dict[str, Any]]):
    """Loss per step of every trial (coloured by log lr), and each trial's objective against its lr."""
    from matplotlib import cm, colors

    from dinoflow.report.figures import new_figure

    fig = new_figure(10.0, 3.8)
    ax, ax2 = fig.subplots(1, 2)
    lrs = [c["lr"] for c in curves.values()] or [1.0]
    norm = colors.LogNorm(min(lrs), max(lrs) * (1.0001 if min(lrs) == max(lrs) else 1.0))
    for number, c in sorted(curves.items()):
        y = np.array(c["losses"], dtype=float)
        ax.plot(np.arange(len(y)), np.where(np.isfinite(y), y, np.nan), color=cm.viridis(norm(c["lr"])), lw=1.2,
                ls="--" if c["state"] == "PRUNED" else "-", label=f"#{number} lr={c['lr']:.2g} {c['state'].lower()}")
        ax2.scatter([c["lr"]], [c["value"]] if math.isfinite(c["value"]) else [np.nan], color=cm.viridis(norm(c["lr"])))
    ax.set_xlabel("step")
    ax.set_ylabel("training loss")
    ax.set_title("loss per trial (dashed: pruned)")
    ax.legend(fontsize=6)
    ax2.set_xscale("log")
    ax2.set_xlabel("lr (per 256 images)")
    ax2.set_ylabel("objective (mean loss, last quarter)")
    ax2.set_title("objective per trial")
    for a in (ax, ax2):
        a.grid(alpha=0.3)
    fig.tight_layout()
    return fig


def main(params: dict[str, Any], images: Any = None) -> dict[str, float]:
    import optuna

    from dinoflow.data.store import ImageStore
    from dinoflow.report.figures import save_figure

    s = params["lr_search"]
    lo, hi = (float(v) for v in s["lr_range"])
    if not 0 < lo < hi:
        raise DinoflowError(f"lr_search.lr_range: need 0 < low < high, got {s['lr_range']!r}")
    images = images if images is not None else ImageStore(paths.PROCESSED_DIR)
    seed = int(params["seed"])
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    max_steps = int(s["max_steps"])
    study = optuna.create_study(
        direction="minimize", sampler=optuna.samplers.TPESampler(seed=seed),
        pruner=optuna.pruners.MedianPruner(n_startup_trials=2, n_warmup_steps=max(1, max_steps // 4)))
    curves: dict[int, dict[str, Any]] = {}

    def objective(trial: optuna.Trial) -> float:
        lr = trial.suggest_float("lr", lo, hi, log=True)
        wd = trial.suggest_float("weight_decay", 1e-3, 0.2, log=True) if s.get("search_weight_decay") else None
        temp = trial.suggest_float("teacher_temp", 0.02, 0.1) if s.get("search_teacher_temp") else None
        curve = curves.setdefault(trial.number, {"lr": lr, "losses": [], "state": "RUNNING", "value": math.inf})

        def report(step: int, loss: float) -> None:
            curve["losses"].append(loss)
            trial.report(loss if math.isfinite(loss) else 1e9, step)
            if trial.should_prune():
                curve["state"] = "PRUNED"
                raise optuna.TrialPruned()

        value = objective_value(run_trial(params, images, lr, wd, temp, report))
        curve.update(state="COMPLETE", value=value)
        log.info("trial %d: lr=%.3g -> %.4f", trial.number, lr, value)
        return value if math.isfinite(value) else 1e9

    log.info("lr search: %d trials x %d steps, lr in [%g, %g] (TPE seed %d, median pruning)", s["n_trials"],
             max_steps, lo, hi, seed)
    study.optimize(objective, n_trials=int(s["n_trials"]), show_progress_bar=True)
    complete = [tr for tr in study.trials if tr.state == optuna.trial.TrialState.COMPLETE]
    if not complete:
        raise DinoflowError("lr search: no trial completed (all pruned or failed); widen lr_search.lr_range")
    if not any(math.isfinite(curves[tr.number]["value"]) for tr in complete):  # only the 1e9 stand-in values
        raise DinoflowError(f"lr search: all {len(complete)} completed trials diverged (NaN / infinite loss) for lr "
                            f"in [{lo:g}, {hi:g}]; no learning rate written to {paths.LR_SEARCH_BEST}: lower "
                            "lr_search.lr_range")
    best = {k: float(v) for k, v in study.best_params.items()}
    best.update(objective=float(study.best_value), trial=int(study.best_trial.number), n_trials=len(study.trials),
                lr_units="per 256 images (scaled by train.batch_size / 256 in training)")
    write_json(paths.LR_SEARCH_BEST, best)
    table = study.trials_dataframe(attrs=("number", "value", "params", "state", "duration"))
    table["duration"] = table["duration"].dt.total_seconds()
    table = table.rename(columns=lambda c: c.replace("params_", ""))
    Path(paths.LR_SEARCH_TRIALS).parent.mkdir(parents=True, exist_ok=True)
    table.to_csv(paths.LR_SEARCH_TRIALS, index=False)
    for c in curves.values():  # trials that ended without a report (e.g. an exception) keep RUNNING
        c["state"] = "PRUNED" if c["state"] == "RUNNING" else c["state"]
    save_figure(curves_figure(curves), paths.LR_SEARCH_PLOT)
    log.info("lr search: best lr %.3g (objective %.4f) -> %s; trials -> %s; figure -> %s", best["lr"],
             best["objective"], paths.LR_SEARCH_BEST, paths.LR_SEARCH_TRIALS, paths.LR_SEARCH_PLOT)
    return best
