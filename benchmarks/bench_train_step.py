"""Throughput (images/s) of one dinoflow DINO training step vs lightly's DINO on the same backbone, crops and batch.

    OMP_NUM_THREADS=2 python benchmarks/bench_train_step.py [--quick] [--batch B] [--steps N] [--device cpu|cuda]

Backbone: params.yaml `backbone` (a fresh seeded Encoder for each side); crops: one multi-crop batch of random
images made once by the method's view maker (2 global + train.n_local_crops local crops) and reused by all sides,
so data loading is not timed. Sides, each a full step (teacher forward, student forward, loss, backward,
gradient clipping, AdamW step, EMA update):
- lightly (baseline): `lightly.models.modules.DINOProjectionHead` + `lightly.loss.DINOLoss` +
  `lightly.models.utils.update_momentum`, the loop of lightly's DINO example;
- dinoflow, DINO only: the engine's `train_step` with method dinov2, iBOT and KoLeo off (lightly's objective);
- dinoflow, full recipe: with iBOT masked-patch and KoLeo losses as params.yaml sets them.
Steps alternate between sides (A B C A B C ...) so load changes on a shared machine hit all sides alike; the
median step time is reported. Results: benchmarks/results/train_step.json / .md (train_step_quick.* with --quick).
"""

from __future__ import annotations

import copy
import platform
import statistics
import sys
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent


def dinoflow_step(params: dict, batch_size: int, device: torch.device, full: bool):
    """A dinoflow DINOv2 step on the engine (iBOT and KoLeo off unless `full`) and its batch (views as tensors)."""
    from _engine_bench import engine_and_batch

    section = {} if full else {"ibot_loss_weight": 0.0, "koleo_loss_weight": 0.0}
    engine, batch, extras = engine_and_batch(params, "dinov2", batch_size, device, section)
    counter = iter(range(10_000))
    return (lambda: engine.train_step(batch, next(counter), extras)), batch


def lightly_step(params: dict, batch, device: torch.device):
    from lightly.loss import DINOLoss
    from lightly.models.modules import DINOProjectionHead
    from lightly.models.utils import deactivate_requires_grad, update_momentum

    from dinoflow.models.factory import create_encoder
    from dinoflow.train.engine import allow_any_input_size

    t = {**params["train"], **params["methods"]["dinov2"]}
    torch.manual_seed(0)
    encoder, _ = create_encoder(params, "scratch")
    allow_any_input_size(encoder)  # the same local-crop handling as dinoflow
    def head():
        return DINOProjectionHead(encoder.embed_dim, t["hidden_dim"], t["bottleneck_dim"], t["out_dim"],
                                  freeze_last_layer=t["freeze_last_layer_epochs"])

    student = torch.nn.ModuleDict({"backbone": encoder, "head": head()}).to(device)
    # lightly's example builds the teacher head anew (its weight_norm head cannot be deep-copied), then copies.
    teacher = torch.nn.ModuleDict({"backbone": copy.deepcopy(encoder), "head": head()}).to(device)
    teacher.load_state_dict(student.state_dict())
    deactivate_requires_grad(teacher)
    criterion = DINOLoss(output_dim=t["out_dim"], warmup_teacher_temp=t["warmup_teacher_temp"],
                         teacher_temp=t["teacher_temp"], warmup_teacher_temp_epochs=t["warmup_teacher_temp_epochs"],
                         student_temp=t["student_temp"]).to(device)
    opt = torch.optim.AdamW(student.parameters(), lr=1e-4, weight_decay=t["weight_decay"])
    g = torch.cat(batch.views[:2]).to(device)
    n_local = len(batch.views) - 2
    local = torch.cat(batch.views[2:]).to(device) if n_local else None
    from _engine_bench import finish_step

    def step():
        update_momentum(student, teacher, m=t["momentum"])
        with torch.no_grad():
            t_out = teacher["head"](teacher["backbone"](g)).chunk(2)
        s_out = list(student["head"](student["backbone"](g)).chunk(2))
        if local is not None:
            s_out += list(student["head"](student["backbone"](local)).chunk(n_local))
        loss = criterion(list(t_out), s_out, epoch=0)
        return finish_step(loss, list(student.parameters()), opt, t["clip_grad"],
                           before_clip=lambda: student["head"].cancel_last_layer_gradients(current_epoch=0))

    return step


def main() -> int:
    from _engine_bench import step_bench_setup, time_alternating

    from dinoflow.utils import write_json

    args, params, batch_size, steps, device = step_bench_setup(__doc__)
    params["train"]["grad_checkpointing"] = False
    dino_only, batch = dinoflow_step(params, batch_size, device, full=False)
    full_recipe, _ = dinoflow_step(params, batch_size, device, full=True)
    sides = {"lightly": lightly_step(params, batch, device), "dinoflow_dino_only": dino_only,
             "dinoflow_full_recipe": full_recipe}
    times = time_alternating(sides, steps, device)
    med = {k: statistics.median(v) for k, v in times.items()}
    ips = {k: batch_size / v for k, v in med.items()}
    result = {
        "backbone": params["backbone"], "batch": batch_size, "n_local_crops": params["train"]["n_local_crops"],
        "global_crop_size": params["train"]["global_crop_size"], "local_crop_size": params["train"]["local_crop_size"],
        "out_dim": params["methods"]["dinov2"]["out_dim"], "timed_steps_per_side": steps, "device": str(device),
        "threads": torch.get_num_threads(), "platform": platform.platform(), "torch": torch.__version__,
        "median_step_s": med, "images_per_s": ips,
        "ratio_dinoflow_dino_only_vs_lightly": ips["dinoflow_dino_only"] / ips["lightly"],
        "ratio_dinoflow_full_recipe_vs_lightly": ips["dinoflow_full_recipe"] / ips["lightly"],
        "step_times_s": times,
    }
    name = "train_step_quick" if args.quick else "train_step"
    out = HERE / "results"
    write_json(out / f"{name}.json", result)
    md = [f"# DINO training step: dinoflow vs lightly ({'quick' if args.quick else 'full'})", "",
          f"Command: `OMP_NUM_THREADS={torch.get_num_threads()} python benchmarks/bench_train_step.py"
          f"{' --quick' if args.quick else ''}`  ",
          f"Backbone {params['backbone']['arch']} {params['backbone'].get('kwargs')}, batch {batch_size}, "
          f"2x{params['train']['global_crop_size']} px + {params['train']['n_local_crops']}x"
          f"{params['train']['local_crop_size']} px crops, out_dim {params['methods']['dinov2']['out_dim']}, {device}, "
          f"{torch.get_num_threads()} threads, median of {steps} alternating steps.", "",
          "| side | median step (s) | images/s | ratio vs lightly |", "|---|---|---|---|"]
    for k in sides:
        md.append(f"| {k} | {med[k]:.3f} | {ips[k]:.1f} | {ips[k] / ips['lightly']:.2f} |")
    (out / f"{name}.md").write_text("\n".join(md) + "\n", encoding="utf-8")
    print("\n".join(md))
    return 0


if __name__ == "__main__":
    sys.exit(main())
