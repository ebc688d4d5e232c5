"""Throughput (images/s) of one dinoflow DINO training step vs lightly's DINO on the same backbone, crops and batch.

    OMP_NUM_THREADS=2 python benchmarks/bench_train_step.py [--quick] [--batch B] [--steps N] [--device cpu|cuda]

Backbone: params.yaml `backbone` (a fresh seeded Encoder for each side); crops: one multi-crop batch of random
images made once by `dinoflow.ssl.augment` (2 global + train.n_local_crops local crops) and reused by both sides,
so data loading is not timed. Sides, each a full step (teacher forward, student forward, loss, backward,
gradient clipping, AdamW step, EMA update):
- lightly (baseline): `lightly.models.modules.DINOProjectionHead` + `lightly.loss.DINOLoss` +
  `lightly.models.utils.update_momentum`, the loop of lightly's DINO example;
- dinoflow, DINO only: `DinoTrainer.train_step` with iBOT and KoLeo off (the same objective as lightly);
- dinoflow, full recipe: with iBOT masked-patch and KoLeo losses as params.yaml sets them.
Steps alternate between sides (A B C A B C ...) so load changes on a shared machine hit all sides alike; the
median step time is reported. Results: benchmarks/results/train_step.json / .md (train_step_quick.* with --quick).
"""

from __future__ import annotations

import argparse
import copy
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
import yaml

HERE = Path(__file__).resolve().parent
REPO = HERE.parent


def make_batch(train: dict, batch: int, seed: int = 0) -> dict:
    from dinoflow.ssl.augment import MultiCropAugmentation, collate_multicrop

    g = torch.Generator().manual_seed(seed)
    images = [torch.randint(0, 256, (3, 128, 128), dtype=torch.uint8, generator=g) for _ in range(batch)]
    aug = MultiCropAugmentation.from_params(train)
    return collate_multicrop([(aug(im, seed=i), i) for i, im in enumerate(images)])


def dinoflow_step(params: dict, batch: dict, device: torch.device, full: bool):
    from dinoflow.models.factory import create_encoder
    from dinoflow.train import dino
    from dinoflow.train.distributed import DistContext

    p = copy.deepcopy(params)
    if not full:
        p["train"].update(ibot_loss_weight=0.0, koleo_loss_weight=0.0)
    torch.manual_seed(0)
    encoder, _ = create_encoder(p, "scratch")
    trainer = dino.DinoTrainer(p, encoder, trainable="all", finetune=False, epochs=1, steps_per_epoch=10_000,
                               ctx=DistContext(0, 1, 0, device))
    b = batch["indices"].shape[0]
    masks = trainer.local_masks(list(range(b)), 0)
    counter = iter(range(10_000))
    return lambda: trainer.train_step(batch, next(counter), masks)


def lightly_step(params: dict, batch: dict, device: torch.device):
    from lightly.loss import DINOLoss
    from lightly.models.modules import DINOProjectionHead
    from lightly.models.utils import deactivate_requires_grad, update_momentum

    from dinoflow.models.factory import create_encoder
    from dinoflow.train.dino import allow_any_input_size

    t = params["train"]
    torch.manual_seed(0)
    encoder, _ = create_encoder(params, "scratch")
    allow_any_input_size(encoder)  # the same local-crop handling as dinoflow
    def head():
        return DINOProjectionHead(encoder.embed_dim, t["head_hidden_dim"], t["head_bottleneck_dim"], t["out_dim"],
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
    g = batch["global_crops"].to(device)
    local = batch["local_crops"].to(device) if batch["local_crops"] is not None else None
    n_local = batch["n_local_crops"]

    def step():
        update_momentum(student, teacher, m=t["momentum_teacher"])
        with torch.no_grad():
            t_out = teacher["head"](teacher["backbone"](g)).chunk(2)
        s_out = list(student["head"](student["backbone"](g)).chunk(2))
        if local is not None:
            s_out += list(student["head"](student["backbone"](local)).chunk(n_local))
        loss = criterion(list(t_out), s_out, epoch=0)
        loss.backward()
        student["head"].cancel_last_layer_gradients(current_epoch=0)
        torch.nn.utils.clip_grad_norm_(student.parameters(), t["clip_grad"])
        opt.step()
        opt.zero_grad(set_to_none=True)
        return float(loss.detach())

    return step


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="batch 8, 3 timed steps per side")
    ap.add_argument("--batch", type=int, default=None, help="images per step (default: train.batch_size; quick: 8)")
    ap.add_argument("--steps", type=int, default=None, help="timed steps per side (default 10; quick 3)")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--params", default=str(REPO / "params.yaml"))
    args = ap.parse_args()
    from dinoflow.utils import resolve_device, write_json

    with open(args.params, encoding="utf-8") as fh:
        params = yaml.safe_load(fh)
    params["train"]["grad_checkpointing"] = False
    batch_size = args.batch or (8 if args.quick else int(params["train"]["batch_size"]))
    steps = args.steps or (3 if args.quick else 10)
    device = resolve_device(args.device)
    batch = make_batch(params["train"], batch_size)
    sides = {"lightly": lightly_step(params, batch, device),
             "dinoflow_dino_only": dinoflow_step(params, batch, device, full=False),
             "dinoflow_full_recipe": dinoflow_step(params, batch, device, full=True)}
    times: dict[str, list[float]] = {k: [] for k in sides}
    for k, fn in sides.items():  # warm-up (allocations, lazy inits)
        fn()
    for _ in range(steps):
        for k, fn in sides.items():
            if device.type == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            fn()
            if device.type == "cuda":
                torch.cuda.synchronize()
            times[k].append(time.perf_counter() - t0)
    med = {k: statistics.median(v) for k, v in times.items()}
    ips = {k: batch_size / v for k, v in med.items()}
    result = {
        "backbone": params["backbone"], "batch": batch_size, "n_local_crops": params["train"]["n_local_crops"],
        "global_crop_size": params["train"]["global_crop_size"], "local_crop_size": params["train"]["local_crop_size"],
        "out_dim": params["train"]["out_dim"], "timed_steps_per_side": steps, "device": str(device),
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
          f"{params['train']['local_crop_size']} px crops, out_dim {params['train']['out_dim']}, {device}, "
          f"{torch.get_num_threads()} threads, median of {steps} alternating steps.", "",
          "| side | median step (s) | images/s | ratio vs lightly |", "|---|---|---|---|"]
    for k in sides:
        md.append(f"| {k} | {med[k]:.3f} | {ips[k]:.1f} | {ips[k] / ips['lightly']:.2f} |")
    (out / f"{name}.md").write_text("\n".join(md) + "\n", encoding="utf-8")
    print("\n".join(md))
    return 0


if __name__ == "__main__":
    sys.exit(main())
