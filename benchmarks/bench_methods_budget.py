"""The method comparison's CPU budget (`make methods`): one full-length training step per method at the comparison
settings (params.yaml + workflow/profiles/methods/params.yaml: backbone, batch, crops, each method's section), and
the training time those settings imply.

    OMP_NUM_THREADS=1 python benchmarks/bench_methods_budget.py [--quick] [--steps N] [--methods simclr byol ...]

A step is `Engine.train_step` (forward of every network, loss, backward, clipping, AdamW, momentum updates) on one
batch of views made once from random images, so data loading and the stage's start-up are NOT included (the
reduced end-to-end run in docs/methods.md measures those). Median of N steps after one warm-up step; the machine's
load average is recorded with the numbers (a shared machine's load changes them several-fold).
Results: benchmarks/results/methods_budget.json / .md (methods_budget_quick.* with --quick: 1 timed step).
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
import yaml

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(HERE))
OVERLAY = REPO / "workflow" / "profiles" / "methods" / "params.yaml"


def main() -> int:
    from _engine_bench import engine_and_batch

    from dinoflow.utils import write_json
    from dinoflow.workflow.run_dir import merge_params, read_overlay

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="1 timed step per method")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--methods", nargs="*", default=None)
    args = parser.parse_args()
    steps = 1 if args.quick else args.steps
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    with open(REPO / "params.yaml", encoding="utf-8") as fh:
        params = merge_params(yaml.safe_load(fh), read_overlay(OVERLAY))
    trained = [m for m in params["models"] if m["method"] != "none"]
    if args.methods:
        trained = [m for m in trained if m["method"] in args.methods]
    t = params["train"]
    n_steps = t["epochs"] * t["max_steps_per_epoch"]
    rows, loads = {}, []
    for m in trained:
        engine, batch, extras = engine_and_batch(params, m["method"], t["batch_size"], torch.device("cpu"),
                                                 model=m["name"])
        engine.train_step(batch, 0, extras)  # warm-up
        times = []
        for it in range(1, steps + 1):
            t0 = time.perf_counter()
            engine.train_step(batch, it, extras)
            times.append(time.perf_counter() - t0)
        loads.append(os.getloadavg()[0])
        med = statistics.median(times)
        rows[m["name"]] = {"method": m["method"], "views": [list(v.shape[1:]) for v in batch.views],
                           "median_step_s": med, "step_times_s": times, "load_average_1min": loads[-1],
                           "training_s_at_comparison_steps": med * n_steps}
        print(f"{m['name']}: {med:.2f} s/step (load {loads[-1]:.1f})", flush=True)
        del engine
    total = sum(r["training_s_at_comparison_steps"] for r in rows.values())
    result = {"backbone": params["backbone"], "batch": t["batch_size"], "steps_per_model": n_steps,
              "threads": torch.get_num_threads(), "platform": platform.platform(), "torch": torch.__version__,
              "load_average_range": [min(loads), max(loads)], "models": rows,
              "training_s_all_methods_one_core": total}
    name = "methods_budget_quick" if args.quick else "methods_budget"
    write_json(HERE / "results" / f"{name}.json", result)
    md = [f"# Method comparison budget: one training step per method ({'quick' if args.quick else 'full'})", "",
          f"Command: `OMP_NUM_THREADS={torch.get_num_threads()} python benchmarks/bench_methods_budget.py"
          f"{' --quick' if args.quick else ''}`  ",
          f"Settings: params.yaml + workflow/profiles/methods/params.yaml; backbone {params['backbone']['arch']} "
          f"{params['backbone'].get('kwargs')}, batch {t['batch_size']}, cpu, {torch.get_num_threads()} thread(s), "
          f"median of {steps} step(s) after a warm-up; 1-min load average {min(loads):.1f}-{max(loads):.1f} "
          "(shared machine). Engine step only: no data loading, no stage start-up.", "",
          "| model | method | views | median step (s) | x steps of the comparison (s) |", "|---|---|---|---|---|"]
    for name_, r in rows.items():
        views = ", ".join("x".join(map(str, v[1:])) for v in r["views"])
        md.append(f"| {name_} | {r['method']} | {views} | {r['median_step_s']:.2f} | "
                  f"{n_steps} x = {r['training_s_at_comparison_steps']:.0f} |")
    md += ["", f"Sum over the methods: {total:.0f} s of training steps on one core ({n_steps} steps each)."]
    (HERE / "results" / f"{name}.md").write_text("\n".join(md) + "\n", encoding="utf-8")
    print("\n".join(md))
    return 0


if __name__ == "__main__":
    sys.exit(main())
