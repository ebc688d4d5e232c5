"""Peak memory of one DINO training step with and without gradient checkpointing (`train.grad_checkpointing`).

    OMP_NUM_THREADS=2 python benchmarks/bench_grad_checkpointing.py [--quick] [--batch B] [--device cpu|cuda]

Each setting runs in its own fresh process (so one cannot inherit the other's allocator high-water mark) and does
one measured (GPU: after a warm-up step) DINOv2 step of the engine (`Engine.train_step`) of the params.yaml `backbone` on one multi-crop batch.
GPU: `torch.cuda.max_memory_allocated` over the measured step minus the memory held before it. CPU: peak resident
set size (`ru_maxrss`) minus the resident size just before the step, for the first step of a fresh process (the
allocator keeps freed memory, so a second step in the same process would hide its growth); both settings allocate
the same AdamW state in that step, the difference is activations. The baseline of the ratio is the run without checkpointing, measured in the same
invocation. Results: benchmarks/results/grad_checkpointing.json / .md (grad_checkpointing_quick.* with --quick).
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch
import yaml

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(HERE))


def _rss_bytes() -> int:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * resource.getpagesize()


def child(params_path: str, batch: int, ckpt: bool, device_name: str) -> dict:
    import copy

    from _engine_bench import engine_and_batch

    from dinoflow.utils import resolve_device

    with open(params_path, encoding="utf-8") as fh:
        params = yaml.safe_load(fh)
    params = copy.deepcopy(params)
    params["train"]["grad_checkpointing"] = ckpt
    device = resolve_device(device_name)
    trainer, data, masks = engine_and_batch(params, "dinov2", batch, device)
    # GPU: measure the second step (the first allocates AdamW's state). CPU: the allocator keeps freed memory, so
    # only a fresh process's first step is clean: its peak RSS growth (the same AdamW state in both settings,
    # plus activations and gradients, which checkpointing changes).
    if device.type == "cuda":
        trainer.train_step(data, 0, masks)
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
    else:
        before = _rss_bytes()
    t0 = time.perf_counter()
    trainer.train_step(data, 1, masks)
    elapsed = time.perf_counter() - t0
    if device.type == "cuda":
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() - before
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - before
    return {"peak_step_bytes": int(peak), "step_s": elapsed, "device": str(device)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="batch 8")
    ap.add_argument("--batch", type=int, default=None)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--params", default=str(REPO / "params.yaml"))
    ap.add_argument("--child", choices=["on", "off"], help=argparse.SUPPRESS)
    args = ap.parse_args()
    with open(args.params, encoding="utf-8") as fh:
        params = yaml.safe_load(fh)
    batch = args.batch or (8 if args.quick else int(params["train"]["batch_size"]))
    if args.child:
        print(json.dumps(child(args.params, batch, args.child == "on", args.device)))
        return 0
    from dinoflow.utils import write_json

    runs = {}
    for setting in ("off", "on"):
        cmd = [sys.executable, __file__, "--child", setting, "--batch", str(batch), "--device", args.device,
               "--params", args.params]
        out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout.strip().splitlines()[-1]
        runs[setting] = json.loads(out)
    off, on = runs["off"]["peak_step_bytes"], runs["on"]["peak_step_bytes"]
    result = {"backbone": params["backbone"], "batch": batch, "n_local_crops": params["train"]["n_local_crops"],
              "global_crop_size": params["train"]["global_crop_size"], "device": runs["off"]["device"],
              "platform": platform.platform(), "torch": torch.__version__,
              "peak_step_mib": {k: v["peak_step_bytes"] / 2**20 for k, v in runs.items()},
              "step_s": {k: v["step_s"] for k, v in runs.items()},
              "memory_ratio_checkpointing_vs_plain": on / off if off else None,
              "time_ratio_checkpointing_vs_plain": runs["on"]["step_s"] / runs["off"]["step_s"]}
    name = "grad_checkpointing_quick" if args.quick else "grad_checkpointing"
    write_json(HERE / "results" / f"{name}.json", result)
    md = [f"# Gradient checkpointing: memory of one DINO step ({'quick' if args.quick else 'full'})", "",
          f"Command: `python benchmarks/bench_grad_checkpointing.py{' --quick' if args.quick else ''}`  ",
          f"Backbone {params['backbone']['arch']} {params['backbone'].get('kwargs')}, batch {batch}, "
          f"{result['device']}; memory = peak growth during one step over the memory held before it.", "",
          "| grad checkpointing | step peak (MiB) | step time (s) |", "|---|---|---|"]
    for k in ("off", "on"):
        md.append(f"| {k} | {result['peak_step_mib'][k]:.1f} | {result['step_s'][k]:.2f} |")
    md += ["", f"Memory ratio (on / off): **{result['memory_ratio_checkpointing_vs_plain']:.2f}**; "
           f"time ratio: {result['time_ratio_checkpointing_vs_plain']:.2f}"]
    (HERE / "results" / f"{name}.md").write_text("\n".join(md) + "\n", encoding="utf-8")
    print("\n".join(md))
    return 0


if __name__ == "__main__":
    sys.exit(main())
