"""Training throughput (images/s) per method: dinoflow's engine vs lightly's implementation of the same method on
the same backbone, views and batch.

    OMP_NUM_THREADS=2 python benchmarks/bench_methods.py [--quick] [--batch B] [--steps N] [--device cpu|cuda]
                                                         [--methods simclr byol ...]

Backbone: params.yaml `backbone` (a fresh seeded Encoder per side); views: one batch made once by the dinoflow
method's view maker from random images and given to both sides (data loading is not timed). Heads: each method's
`methods.<name>` settings (params.yaml, else the method's defaults), the same sizes on both sides. A step on
either side is a full optimisation step: forward of every network, loss, backward, gradient-norm clipping at
`train.clip_grad`, AdamW step, momentum update where the method has one.
- lightly side: the loop of lightly's example for that method (its heads, its loss, `update_momentum`, lightly's
  `MemoryBankModule` through `NTXentLoss(memory_bank_size=...)` for MoCo v2), written here in a few lines;
- dinoflow side: `Engine.train_step` of the registered method (which also logs its terms, monitors and grad norms).
Steps alternate between the two sides (A B A B ...) so load changes on a shared machine hit both alike; the
median step time is reported, and the ratio dinoflow / lightly images/s from this one run.
Results: benchmarks/results/methods.json / .md (methods_quick.* with --quick).
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
import torch.nn.functional as F
import yaml

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(HERE))

METHODS = ["simclr", "moco_v2", "moco_v3", "byol", "simsiam", "barlow_twins", "vicreg", "swav", "dino"]


def lightly_step(method: str, params: dict, cfg, batch, device: torch.device, clip: float | None):
    """One step of lightly's example of `method` (cfg: the dinoflow method's parsed Config, for the sizes)."""
    from lightly import loss as L
    from lightly.models.modules import heads as H
    from lightly.models.utils import deactivate_requires_grad, update_momentum

    from dinoflow.models.factory import create_encoder
    from dinoflow.train.engine import allow_any_input_size

    torch.manual_seed(0)
    backbone, _ = create_encoder(params, "scratch")
    allow_any_input_size(backbone)
    d = backbone.embed_dim
    views = [v.to(device) for v in batch.views]
    momentum = None
    if method == "simclr":
        head, crit = H.SimCLRProjectionHead(d, cfg.hidden_dim, cfg.out_dim), L.NTXentLoss(temperature=cfg.temperature)
        model = torch.nn.ModuleDict({"backbone": backbone, "head": head})

        def loss_fn():
            z0, z1 = (model["head"](model["backbone"](v)) for v in views)
            return crit(z0, z1)
    elif method == "moco_v2":
        head = H.MoCoProjectionHead(d, cfg.hidden_dim, cfg.out_dim)
        model = torch.nn.ModuleDict({"backbone": backbone, "head": head})
        momentum = copy.deepcopy(model)
        crit = L.NTXentLoss(temperature=cfg.temperature, memory_bank_size=(cfg.queue_size, cfg.out_dim))

        def loss_fn():
            q = model["head"](model["backbone"](views[0]))
            with torch.no_grad():
                k = momentum["head"](momentum["backbone"](views[1]))
            return crit(q, k)
    elif method == "moco_v3":
        proj = H.MoCoProjectionHead(d, cfg.hidden_dim, cfg.out_dim, num_layers=3, batch_norm=True)
        pred = H.MoCoProjectionHead(cfg.out_dim, cfg.hidden_dim, cfg.out_dim, num_layers=2, batch_norm=True)
        model = torch.nn.ModuleDict({"backbone": backbone, "head": proj, "pred": pred})
        momentum = copy.deepcopy(torch.nn.ModuleDict({"backbone": backbone, "head": proj}))
        t = cfg.temperature

        def ctr(q, k):
            q, k = F.normalize(q, dim=1), F.normalize(k, dim=1)
            return F.cross_entropy(q @ k.t() / t, torch.arange(q.shape[0], device=q.device)) * 2 * t

        def loss_fn():
            q0, q1 = (model["pred"](model["head"](model["backbone"](v))) for v in views)
            with torch.no_grad():
                k0, k1 = (momentum["head"](momentum["backbone"](v)) for v in views)
            return ctr(q0, k1) + ctr(q1, k0)
    elif method in ("byol", "simsiam"):
        if method == "byol":
            proj, pred = (H.BYOLProjectionHead(d, cfg.hidden_dim, cfg.out_dim),
                          H.BYOLPredictionHead(cfg.out_dim, cfg.hidden_dim, cfg.out_dim))
        else:
            proj, pred = (H.SimSiamProjectionHead(d, cfg.hidden_dim, cfg.out_dim),
                          H.SimSiamPredictionHead(cfg.out_dim, cfg.pred_hidden_dim, cfg.out_dim))
        model = torch.nn.ModuleDict({"backbone": backbone, "head": proj, "pred": pred})
        if method == "byol":
            momentum = copy.deepcopy(torch.nn.ModuleDict({"backbone": backbone, "head": proj}))
        crit = L.NegativeCosineSimilarity()

        def loss_fn():
            z = [model["head"](model["backbone"](v)) for v in views]
            p = [model["pred"](x) for x in z]
            if momentum is not None:
                with torch.no_grad():
                    z = [momentum["head"](momentum["backbone"](v)) for v in views]
            return 0.5 * (crit(p[0], z[1].detach()) + crit(p[1], z[0].detach()))
    elif method in ("barlow_twins", "vicreg"):
        if method == "barlow_twins":
            head, crit = (H.BarlowTwinsProjectionHead(d, cfg.hidden_dim, cfg.out_dim),
                          L.BarlowTwinsLoss(lambda_param=cfg.lambda_param))
        else:
            head = H.VICRegProjectionHead(d, cfg.hidden_dim, cfg.out_dim, num_layers=cfg.num_layers)
            crit = L.VICRegLoss(cfg.lambda_param, cfg.mu_param, cfg.nu_param)
        model = torch.nn.ModuleDict({"backbone": backbone, "head": head})

        def loss_fn():
            z0, z1 = (model["head"](model["backbone"](v)) for v in views)
            return crit(z0, z1)
    elif method == "swav":
        model = torch.nn.ModuleDict({"backbone": backbone, "head": H.SwaVProjectionHead(d, cfg.hidden_dim, cfg.out_dim),
                                     "prototypes": H.SwaVPrototypes(cfg.out_dim, cfg.n_prototypes)})
        crit = L.SwaVLoss(cfg.temperature, cfg.sinkhorn_iterations, cfg.sinkhorn_epsilon)

        def loss_fn():
            model["prototypes"].normalize()
            out = [model["prototypes"](F.normalize(model["head"](model["backbone"](v)), dim=1)) for v in views]
            return crit(out[:2], out[2:])
    elif method == "dino":
        head = H.DINOProjectionHead(d, cfg.hidden_dim, cfg.bottleneck_dim, cfg.out_dim)
        model = torch.nn.ModuleDict({"backbone": backbone, "head": head})
        # lightly's example builds the teacher head anew (a weight_norm head cannot be deep-copied), then copies.
        momentum = torch.nn.ModuleDict({"backbone": copy.deepcopy(backbone),
                                        "head": H.DINOProjectionHead(d, cfg.hidden_dim, cfg.bottleneck_dim,
                                                                     cfg.out_dim)})
        momentum.load_state_dict(model.state_dict())
        crit = L.DINOLoss(output_dim=cfg.out_dim, teacher_temp=cfg.teacher_temp, student_temp=cfg.student_temp)
        g = torch.cat(views[:2])
        local = torch.cat(views[2:]) if len(views) > 2 else None

        def loss_fn():
            with torch.no_grad():
                t = momentum["head"](momentum["backbone"](g)).chunk(2)
            s = list(model["head"](model["backbone"](g)).chunk(2))
            if local is not None:
                s += list(model["head"](model["backbone"](local)).chunk(len(views) - 2))
            return crit(list(t), s, teacher_temp=cfg.teacher_temp)
    else:
        raise SystemExit(f"no lightly reference for {method}")
    model.to(device)
    crit_modules = [m for m in (locals().get("crit"),) if isinstance(m, torch.nn.Module)]
    for m in crit_modules:
        m.to(device)
    if momentum is not None:
        momentum.to(device)
        deactivate_requires_grad(momentum)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4, weight_decay=0.04)
    m_value = getattr(cfg, "momentum", 0.99)

    def step():
        if momentum is not None:
            update_momentum(model["backbone"], momentum["backbone"], m=m_value)
            update_momentum(model["head"], momentum["head"], m=m_value)
        loss = loss_fn()
        loss.backward()
        if clip:
            torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
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
    ap.add_argument("--methods", nargs="*", default=METHODS)
    ap.add_argument("--params", default=str(REPO / "params.yaml"))
    args = ap.parse_args()
    from _engine_bench import engine_and_batch

    from dinoflow.utils import resolve_device, write_json

    with open(args.params, encoding="utf-8") as fh:
        params = yaml.safe_load(fh)
    params["train"]["grad_checkpointing"] = False
    batch_size = args.batch or (8 if args.quick else int(params["train"]["batch_size"]))
    steps = args.steps or (3 if args.quick else 10)
    device = resolve_device(args.device)
    rows = {}
    for method in args.methods:
        engine, batch, extras = engine_and_batch(params, method, batch_size, device)
        counter = iter(range(10_000))
        sides = {"lightly": lightly_step(method, params, engine.method.cfg, batch, device, engine.cfg.clip_grad),
                 "dinoflow": lambda: engine.train_step(batch, next(counter), extras)}
        times: dict[str, list[float]] = {k: [] for k in sides}
        for fn in sides.values():  # warm-up (allocations, lazy inits)
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
        rows[method] = {"views": [list(v.shape[1:]) for v in batch.views], "median_step_s": med, "images_per_s": ips,
                        "ratio_dinoflow_vs_lightly": ips["dinoflow"] / ips["lightly"], "step_times_s": times}
        print(f"{method}: lightly {ips['lightly']:.1f} img/s, dinoflow {ips['dinoflow']:.1f} img/s, "
              f"ratio {rows[method]['ratio_dinoflow_vs_lightly']:.2f}", flush=True)
        del engine, sides
    result = {"backbone": params["backbone"], "batch": batch_size, "timed_steps_per_side": steps,
              "device": str(device), "threads": torch.get_num_threads(), "platform": platform.platform(),
              "torch": torch.__version__, "methods": rows}
    name = "methods_quick" if args.quick else "methods"
    out = HERE / "results"
    write_json(out / f"{name}.json", result)
    try:
        import os

        load = "load average " + " ".join(f"{x:.1f}" for x in os.getloadavg())
    except OSError:
        load = ""
    md = [f"# Training step per method: dinoflow's engine vs lightly ({'quick' if args.quick else 'full'})", "",
          f"Command: `OMP_NUM_THREADS={torch.get_num_threads()} python benchmarks/bench_methods.py"
          f"{' --quick' if args.quick else ''}`  ",
          f"Backbone {params['backbone']['arch']} {params['backbone'].get('kwargs')}, batch {batch_size}, {device}, "
          f"{torch.get_num_threads()} threads, median of {steps} alternating steps; {load}.", "",
          "| method | views | lightly img/s | dinoflow img/s | ratio dinoflow / lightly |", "|---|---|---|---|---|"]
    for method, r in rows.items():
        views = ", ".join("x".join(map(str, v[1:])) for v in r["views"])
        md.append(f"| {method} | {views} | {r['images_per_s']['lightly']:.1f} | {r['images_per_s']['dinoflow']:.1f} "
                  f"| {r['ratio_dinoflow_vs_lightly']:.2f} |")
    (out / f"{name}.md").write_text("\n".join(md) + "\n", encoding="utf-8")
    print("\n".join(md))
    return 0


if __name__ == "__main__":
    sys.exit(main())
