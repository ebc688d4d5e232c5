"""Throughput (images/s) of one dinoflow MAE training step vs lightly's MAE on the same backbone, decoder and batch.

    OMP_NUM_THREADS=2 python benchmarks/bench_mae_step.py [--quick] [--batch B] [--steps N] [--device cpu|cuda]

Backbone: params.yaml `backbone` (a fresh seeded Encoder for each side); images: one batch of random images cropped
and masked once by dinoflow's MAE views and reused by both sides, so data loading is not timed. The decoder is the
method's default (`methods.mae`: width 128, 2 blocks, 4 heads). Sides, each a full step (encoder on the visible
patches, decoder, loss on per-patch normalised pixels, backward, gradient clipping at train.clip_grad, AdamW):
- lightly (baseline): the loop of lightly's MAE example (`MaskedVisionTransformerTIMM.encode`, the deprecated
  `MAEDecoderTIMM` with `embed` / `decode` / `predict`, `random_token_mask` per step, `patchify`), with
  `normalize_mean_var` targets as the paper's norm_pix_loss;
- dinoflow: `Engine.train_step` of `method: mae` (the masks come from the batch, drawn in the view seam).
Steps alternate between the sides so load changes on a shared machine hit both alike; the median and the minimum
step time are reported (on a busy shared machine the minimum is the steadier estimate of a side's own cost). Results: benchmarks/results/mae_step.json / .md (mae_step_quick.* with --quick).
"""

from __future__ import annotations

import os
import platform
import statistics
import sys
import warnings
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent


def make_images(n: int, seed: int = 0) -> list:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 256, (3, 128, 128), dtype=torch.uint8, generator=g) for _ in range(n)]


def train_config(params: dict, batch: int):
    from dinoflow.train.config import TrainConfig

    t = params["train"]
    return TrainConfig(epochs=1, batch_size=batch, num_workers=0, global_crop_size=t["global_crop_size"],
                       local_crop_size=t["local_crop_size"], n_local_crops=0,
                       global_crop_scale=tuple(t["global_crop_scale"]), local_crop_scale=tuple(t["local_crop_scale"]),
                       lr=1e-4, min_lr=1e-4, warmup_epochs=0, weight_decay=0.05, weight_decay_end=0.05,
                       clip_grad=t["clip_grad"], amp=False, compile=False, grad_checkpointing=False, log_every=1,
                       max_steps_per_epoch=None, checkpoint_every=10_000,
                       evaluate_network=t["evaluate_network"], on_collapse=t["on_collapse"],
                       drift_images=t["drift_images"])


def encoder(params: dict):
    from dinoflow.models.factory import create_encoder

    torch.manual_seed(0)
    enc, _ = create_encoder(params, "scratch")
    return enc


def dinoflow_step(params: dict, images: list, device: torch.device):
    from dinoflow.train.distributed import DistContext
    from dinoflow.train.engine import RunSpec, make_engine

    eng = make_engine(RunSpec("mae", {}, "all", train_config(params, len(images)), None, 0), encoder(params), images,
                      ctx=DistContext(0, 1, 0, device))
    eng.set_epoch(0)
    batch = next(iter(eng.loader))
    counter = iter(range(10_000))
    return lambda: eng.train_step(batch, next(counter) % eng.total_steps), batch, eng.method.cfg


def lightly_step(params: dict, batch, cfg, device: torch.device):
    from lightly.models import utils
    from lightly.models.modules.masked_autoencoder_timm import MAEDecoderTIMM
    from lightly.models.modules.masked_vision_transformer_timm import MaskedVisionTransformerTIMM

    from dinoflow.train.engine import allow_any_input_size

    enc = encoder(params)
    allow_any_input_size(enc)  # as the engine does
    vit = enc.model
    backbone = MaskedVisionTransformerTIMM(vit=vit, weight_initialization="skip", pos_embed_initialization="skip")
    patch = enc.patch_size
    images = batch.views[0].to(device)
    n_patches = (images.shape[-1] // patch) ** 2
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # MAEDecoderTIMM is deprecated in lightly 1.6; its example still uses it
        decoder = MAEDecoderTIMM(num_patches=n_patches, patch_size=patch, embed_dim=enc.embed_dim,
                                 decoder_embed_dim=cfg.decoder_dim, decoder_depth=cfg.decoder_depth,
                                 decoder_num_heads=cfg.decoder_num_heads, num_prefix_tokens=enc.num_prefix_tokens)
    model = torch.nn.ModuleDict({"vit": vit, "decoder": decoder}).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4 * images.shape[0] / 256, weight_decay=0.05)  # as the engine
    seq_len = n_patches + enc.num_prefix_tokens
    clip = params["train"]["clip_grad"]
    from _engine_bench import finish_step

    def step():
        b = images.shape[0]
        idx_keep, idx_mask = utils.random_token_mask((b, seq_len), mask_ratio=cfg.mask_ratio, device=device)
        x = backbone.encode(images=images, idx_keep=idx_keep)
        x = decoder.embed(x)
        full = utils.repeat_token(decoder.mask_token, (b, seq_len))
        full = utils.set_at_index(full, idx_keep, x.type_as(full))
        pred = decoder.predict(utils.get_at_index(decoder.decode(full), idx_mask))
        target = utils.get_at_index(utils.patchify(images, patch), idx_mask - enc.num_prefix_tokens)
        loss = torch.nn.functional.mse_loss(pred, utils.normalize_mean_var(target))
        return finish_step(loss, list(model.parameters()), opt, clip)

    return step


def main() -> int:
    from _engine_bench import step_bench_setup, time_alternating

    from dinoflow.utils import write_json

    args, params, batch_size, steps, device = step_bench_setup(__doc__)
    images = make_images(batch_size)
    ours, batch, cfg = dinoflow_step(params, images, device)
    sides = {"lightly": lightly_step(params, batch, cfg, device), "dinoflow": ours}
    times = time_alternating(sides, steps, device)
    med = {k: statistics.median(v) for k, v in times.items()}
    fastest = {k: min(v) for k, v in times.items()}
    ips = {k: batch_size / v for k, v in med.items()}
    ips_best = {k: batch_size / v for k, v in fastest.items()}
    crop = int(batch.views[0].shape[-1])
    result = {"backbone": params["backbone"], "batch": batch_size, "crop_size": crop, "mask_ratio": cfg.mask_ratio,
              "decoder": {"dim": cfg.decoder_dim, "depth": cfg.decoder_depth, "heads": cfg.decoder_num_heads},
              "timed_steps_per_side": steps, "device": str(device), "threads": torch.get_num_threads(),
              "platform": platform.platform(), "torch": torch.__version__, "median_step_s": med,
              "images_per_s": ips, "ratio_dinoflow_vs_lightly": ips["dinoflow"] / ips["lightly"],
              "min_step_s": fastest, "images_per_s_at_min": ips_best,
              "ratio_dinoflow_vs_lightly_at_min": ips_best["dinoflow"] / ips_best["lightly"],
              "step_times_s": times}
    name = "mae_step_quick" if args.quick else "mae_step"
    out = HERE / "results"
    write_json(out / f"{name}.json", result)
    md = [f"# MAE training step: dinoflow vs lightly ({'quick' if args.quick else 'full'})", "",
          f"Command: `OMP_NUM_THREADS={torch.get_num_threads()} python benchmarks/bench_mae_step.py"
          f"{' --quick' if args.quick else ''}`  ",
          f"Backbone {params['backbone']['arch']} {params['backbone'].get('kwargs')}, batch {batch_size}, {crop} px, "
          f"mask ratio {cfg.mask_ratio}, decoder {cfg.decoder_dim} wide x {cfg.decoder_depth} blocks, {device}, "
          f"{torch.get_num_threads()} threads, {steps} alternating steps per side; load average "
          f"{', '.join(f'{x:.1f}' for x in os.getloadavg())} at the end.", "",
          "| side | median step (s) | images/s | ratio vs lightly | fastest step (s) | ratio at the fastest |",
          "|---|---|---|---|---|---|"]
    for k in sides:
        md.append(f"| {k} | {med[k]:.3f} | {ips[k]:.1f} | {ips[k] / ips['lightly']:.2f} | {fastest[k]:.3f} | "
                  f"{ips_best[k] / ips_best['lightly']:.2f} |")
    (out / f"{name}.md").write_text("\n".join(md) + "\n", encoding="utf-8")
    print("\n".join(md))
    return 0


if __name__ == "__main__":
    sys.exit(main())
