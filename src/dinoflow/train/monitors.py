"""Collapse monitors of DINO training and the per-model collapse verdict (contract 2 of the parallel work).

Each step logs, from the teacher's view of the batch (`teacher_monitors`):
- `teacher/entropy`: mean entropy of the teacher's target distributions over the K prototypes, next to log K
  (`teacher/entropy_fraction` = entropy / log K). Uniform targets (entropy = log K) carry no information;
- `dino_kl`: the student-teacher KL (the DINO cross-entropy minus the teacher entropy, logged by the loop);
- `teacher/std`: the spread of the teacher's L2-normalised CLS embeddings over the batch (std per dimension,
  averaged over dimensions; random unit vectors in D dimensions give ~1/sqrt(D), one point gives 0);
- `teacher/rankme`: the effective rank (`dinoflow.evaluate.health.rankme`, Garrido et al. 2023) of the batch's
  centred teacher CLS embeddings (the shared mean direction removed, so it counts the directions that tell
  images apart), at most min(n - 1, D).

`collapse_verdict` turns the values averaged over the last epoch into one of four verdicts, following the two
collapse modes of DINO (Caron et al. 2021, sec. 5.3 and fig. 7: with centering alone the targets become uniform,
with sharpening alone one-hot; in both the KL between student and teacher goes to 0) plus dimensional collapse
(Jing et al. 2022; the embeddings spread over only a few directions, measured by RankMe). The rule, in order:

1. `uniform_collapse` when the targets are near uniform (entropy >= 95% of log K), or when every image gives the
   same embedding (`teacher/std` < 0.1 / sqrt(D), a tenth of random unit vectors' spread) and the targets are
   closer to uniform than one-hot;
2. `one_hot_collapse` when every image gives the same embedding and the targets are sharp, or when the targets
   are one-hot (entropy <= 5% of log K) and the student already matches them (KL <= 5% of log K);
3. `dimensional_collapse` when RankMe is below 10% of its maximum min(n - 1, D);
4. `healthy` otherwise.
"""

from __future__ import annotations

import math
from typing import Any, Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from dinoflow.evaluate.health import rankme

VERDICTS = ("healthy", "uniform_collapse", "one_hot_collapse", "dimensional_collapse")
UNIFORM_ENTROPY_FRACTION = 0.95   # entropy / log K at or above this: uniform targets
ONE_HOT_ENTROPY_FRACTION = 0.05   # entropy / log K at or below this: one-hot targets
ONE_HOT_KL_FRACTION = 0.05        # KL / log K at or below this: the student already matches the targets
ONE_POINT_STD = 0.1               # teacher/std below ONE_POINT_STD / sqrt(D): all images give one embedding
DIMENSIONAL_RANK_FRACTION = 0.1   # RankMe below this share of min(n - 1, D): dimensional collapse

# The per-step keys the verdict reads (as the engine logs them for a method with targets) and their contract names.
MONITOR_KEYS = {"teacher/entropy": "teacher_entropy", "dino_kl": "student_teacher_kl", "teacher/std": "teacher_std",
                "teacher/rankme": "rankme"}


@torch.no_grad()
def teacher_monitors(teacher_probs: torch.Tensor, teacher_cls: torch.Tensor) -> dict[str, float]:
    """Collapse monitors of one batch.

    teacher_probs: (M, K) target distributions (rows sum to 1); teacher_cls: (M, D) teacher CLS embeddings of
    the same M crops. Returns {"teacher/entropy" (nats), "teacher/entropy_fraction" (entropy / log K),
    "teacher/std", "teacher/rankme"}; all finite (a single row gives std 0 and RankMe 0).
    """
    p = teacher_probs.float()
    entropy = float(-(p * torch.log(p.clamp_min(1e-12))).sum(-1).mean())
    log_k = math.log(p.shape[-1]) if p.shape[-1] > 1 else 1.0
    x = teacher_cls.detach().float()
    normed = F.normalize(x, dim=-1)
    std = float(normed.std(dim=0).mean()) if x.shape[0] > 1 else 0.0
    centred = x.double().cpu().numpy()
    centred = centred - centred.mean(axis=0, keepdims=True)
    return {"teacher/entropy": entropy, "teacher/entropy_fraction": entropy / log_k, "teacher/std": std,
            "teacher/rankme": rankme(centred) if x.shape[0] > 1 else 0.0}


def summarise(history: Sequence[Mapping[str, float]]) -> dict[str, float]:
    """Mean of each monitor over the given steps (e.g. the last epoch), under the contract's names.

    Raises ValueError when `history` is empty or a step lacks a monitor."""
    if not history:
        raise ValueError("collapse monitors: no logged steps to summarise")
    out = {}
    for key, name in MONITOR_KEYS.items():
        values = [float(h[key]) for h in history]
        out[name] = float(np.mean(values))
    return out


def collapse_verdict(teacher_entropy: float, log_k: float, student_teacher_kl: float, teacher_std: float,
                     rankme: float, embed_dim: int, n_samples: int) -> dict[str, Any]:
    """The verdict on a trained model (see the module docstring for the rule and its sources).

    teacher_entropy, student_teacher_kl: nats; log_k: log of the number of prototypes; teacher_std: spread of the
    normalised teacher embeddings; rankme: effective rank of the centred teacher embeddings of `n_samples` rows
    (the crops of one batch) in `embed_dim` dimensions. Returns contract 2's dict: {"verdict", "reason",
    "teacher_entropy", "log_k", "student_teacher_kl", "teacher_std", "rankme", "embed_dim"}.
    Raises ValueError on a non-finite input (a diverged run has no verdict; the loop stops it earlier).
    """
    values = {"teacher_entropy": teacher_entropy, "log_k": log_k, "student_teacher_kl": student_teacher_kl,
              "teacher_std": teacher_std, "rankme": rankme}
    bad = [k for k, v in values.items() if not math.isfinite(float(v))]
    if bad:
        raise ValueError(f"collapse verdict: non-finite {', '.join(bad)}")
    if log_k <= 0 or embed_dim < 1 or n_samples < 2:
        raise ValueError(f"collapse verdict: need log_k > 0, embed_dim >= 1, n_samples >= 2 "
                         f"(got {log_k}, {embed_dim}, {n_samples})")
    h, kl = teacher_entropy / log_k, student_teacher_kl / log_k
    std_floor = ONE_POINT_STD / math.sqrt(embed_dim)
    max_rank = min(n_samples - 1, embed_dim)
    numbers = (f"teacher entropy {teacher_entropy:.3f} = {h:.1%} of log K {log_k:.3f}; KL {student_teacher_kl:.3g};"
               f" embedding std {teacher_std:.3g} (one-point floor {std_floor:.3g}); RankMe {rankme:.1f} of at "
               f"most {max_rank}")
    if teacher_std < std_floor and h >= 0.5:
        verdict, why = "uniform_collapse", "every image gives the same embedding and the targets are near uniform"
    elif h >= UNIFORM_ENTROPY_FRACTION:
        verdict, why = "uniform_collapse", "the teacher's targets are near uniform: they carry no information"
    elif teacher_std < std_floor:
        verdict, why = "one_hot_collapse", "every image gives the same embedding and the same sharp target"
    elif h <= ONE_HOT_ENTROPY_FRACTION and kl <= ONE_HOT_KL_FRACTION:
        verdict, why = "one_hot_collapse", "one-hot targets that the student already matches (KL ~ 0)"
    elif rankme < DIMENSIONAL_RANK_FRACTION * max_rank:
        verdict, why = ("dimensional_collapse",
                        f"the embeddings span few directions (RankMe < {DIMENSIONAL_RANK_FRACTION:.0%} of {max_rank})")
    else:
        verdict, why = "healthy", "no collapse sign"
    return {"verdict": verdict, "reason": f"{why}: {numbers}", **{k: float(v) for k, v in values.items()},
            "embed_dim": int(embed_dim)}


# ---------------------------------------------------------------------------------------- methods without targets
# Methods that do not predict a distribution over prototypes (SimCLR, MoCo, BYOL, SimSiam, Barlow Twins, VICReg,
# SwAV's codes are not logged) are watched through their embeddings only: `embedding_monitors` per step, and
# `embedding_verdict` over the last epoch (the rules 1-3 of `collapse_verdict` without the target-entropy terms).
EMBEDDING_KEYS = ("std", "rankme")


@torch.no_grad()
def embedding_monitors(embeddings: torch.Tensor) -> dict[str, float]:
    """{"std", "rankme"} of a batch's (M, D) embeddings: the spread of the L2-normalised rows (std per dimension,
    averaged) and the RankMe of the centred rows (at most min(M - 1, D)); 0 and 0 for a single row."""
    x = embeddings.detach().float()
    std = float(F.normalize(x, dim=-1).std(dim=0).mean()) if x.shape[0] > 1 else 0.0
    centred = x.double().cpu().numpy()
    centred = centred - centred.mean(axis=0, keepdims=True)
    return {"std": std, "rankme": rankme(centred) if x.shape[0] > 1 else 0.0}


def embedding_verdict(std: float, rankme: float, embed_dim: int, n_samples: int) -> dict[str, Any]:
    """Contract 2's dict for a method without targets: "dimensional_collapse" when every image gives the same
    embedding (std below `ONE_POINT_STD / sqrt(D)`: complete collapse, the limit of dimensional collapse) or when
    RankMe is below `DIMENSIONAL_RANK_FRACTION` of min(n - 1, D); "healthy" otherwise. The target terms
    (teacher_entropy, log_k, student_teacher_kl) are null: such a method has no targets.
    Raises ValueError on a non-finite input or n_samples < 2."""
    if not (math.isfinite(float(std)) and math.isfinite(float(rankme))):
        raise ValueError("collapse verdict: non-finite std or rankme")
    if embed_dim < 1 or n_samples < 2:
        raise ValueError(f"collapse verdict: need embed_dim >= 1 and n_samples >= 2 (got {embed_dim}, {n_samples})")
    floor = ONE_POINT_STD / math.sqrt(embed_dim)
    max_rank = min(n_samples - 1, embed_dim)
    numbers = f"embedding std {std:.3g} (one-point floor {floor:.3g}); RankMe {rankme:.1f} of at most {max_rank}"
    if std < floor:
        verdict, why = "dimensional_collapse", "every image gives the same embedding (complete collapse)"
    elif rankme < DIMENSIONAL_RANK_FRACTION * max_rank:
        verdict, why = ("dimensional_collapse",
                        f"the embeddings span few directions (RankMe < {DIMENSIONAL_RANK_FRACTION:.0%} of {max_rank})")
    else:
        verdict, why = "healthy", "no collapse sign"
    return {"verdict": verdict, "reason": f"{why}: {numbers}", "teacher_entropy": None, "log_k": None,
            "student_teacher_kl": None, "teacher_std": float(std), "rankme": float(rankme),
            "embed_dim": int(embed_dim)}
