"""Shared set-up of the training benchmarks: an engine of a params.yaml model's architecture and one batch of its
views made once from random images (so data loading is not timed); the command line of the step benchmarks
(dinoflow vs lightly) and their alternating timing loop."""

from __future__ import annotations

import argparse
import copy
import time
from pathlib import Path
from typing import Callable

import torch
import yaml
from PIL import Image

REPO = Path(__file__).resolve().parent.parent


def step_bench_setup(description: str) -> tuple[argparse.Namespace, dict, int, int, torch.device]:
    """Parse the command line of a step benchmark (``--quick``, ``--batch``, ``--steps``, ``--device``,
    ``--params``) and load its params.yaml: ``(args, params, batch_size, timed_steps_per_side, device)``;
    the batch defaults to train.batch_size (quick: 8), the steps to 10 (quick: 3)."""
    from dinoflow.utils import resolve_device

    ap = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="batch 8, 3 timed steps per side")
    ap.add_argument("--batch", type=int, default=None, help="images per step (default: train.batch_size; quick: 8)")
    ap.add_argument("--steps", type=int, default=None, help="timed steps per side (default 10; quick 3)")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--params", default=str(REPO / "params.yaml"))
    args = ap.parse_args()
    with open(args.params, encoding="utf-8") as fh:
        params = yaml.safe_load(fh)
    batch_size = args.batch or (8 if args.quick else int(params["train"]["batch_size"]))
    steps = args.steps or (3 if args.quick else 10)
    return args, params, batch_size, steps, resolve_device(args.device)


def time_alternating(sides: dict[str, Callable[[], object]], steps: int,
                     device: torch.device) -> dict[str, list[float]]:
    """Seconds per step of each side: one untimed warm-up step each (allocations, lazy inits), then `steps` rounds
    that run the sides in turn (A B C A B C ...) so load changes on a shared machine hit all sides alike; CUDA is
    synchronised around every timed step."""
    times: dict[str, list[float]] = {k: [] for k in sides}
    for fn in sides.values():
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
    return times


def finish_step(loss: torch.Tensor, params: list[torch.Tensor], opt: torch.optim.Optimizer, clip: float | None,
                before_clip: Callable[[], None] | None = None) -> float:
    """backward, optional gradient hook, clipping, optimizer step, zero_grad: the tail of every baseline step."""
    loss.backward()
    if before_clip is not None:
        before_clip()
    if clip:
        torch.nn.utils.clip_grad_norm_([p for p in params if p.grad is not None], clip)
    opt.step()
    opt.zero_grad(set_to_none=True)
    return float(loss.detach())


def random_images(n: int, size: int = 128, seed: int = 0) -> list:
    g = torch.Generator().manual_seed(seed)
    return [Image.fromarray(torch.randint(0, 256, (size, size, 3), dtype=torch.uint8, generator=g).numpy())
            for _ in range(n)]


def engine_and_batch(params: dict, method: str, batch: int, device: torch.device, section: dict | None = None,
                     model: str = "scratch"):
    """(engine, batch, extras) of `method` on the architecture of `model` (`backbone`), trained from scratch with
    a global batch of `batch` images; `section` overrides `methods.<method>`."""
    from dinoflow.models.factory import create_encoder
    from dinoflow.ssl.methods.base import collate_views
    from dinoflow.train.distributed import DistContext
    from dinoflow.train.engine import make_engine
    from dinoflow.train.run import run_spec

    p = copy.deepcopy(params)
    p["train"].update(batch_size=batch, max_steps_per_epoch=None, epochs=1000, warmup_epochs=0)
    p.setdefault("methods", {})[method] = {**(p.get("methods", {}).get(method) or {}), **(section or {})}
    for m in p["models"]:
        if m["name"] == model:
            m.update(method=method, init="random", trainable="all")
    torch.manual_seed(0)
    encoder, _ = create_encoder(p, model)
    images = random_images(batch)
    engine = make_engine(run_spec(p, model), encoder, images, DistContext(0, 1, 0, device))
    engine.set_epoch(0)
    data = collate_views([engine.dataset[i] for i in range(batch)])
    extras = engine.batch_extras(list(range(batch)), 0)
    return engine, data, extras
