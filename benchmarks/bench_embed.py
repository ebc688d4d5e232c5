"""Embedding throughput including the data pipeline vs the bare backbone forward on the same batches.

    OMP_NUM_THREADS=2 python benchmarks/bench_embed.py [--quick] [--n N] [--device cpu|cuda] [--workers W]
        [--rounds R]

Builds a synthetic collection (`dinoflow.data.synthetic`, 256 px), runs the real `ingest` and `preprocess`
stages into a temporary workspace, saves the `random` model of params.yaml (backbone section), then measures in
the same run:
- pipeline: `dinoflow.evaluate.embed.embed_dataset` over the ImageStore (decode + resize/crop in DataLoader
  workers, uint8 batches, normalise on the device, forward) — what `dinoflow embed` does;
- bare: the same batches, already decoded, transformed and resident on the device, forward only.
Pipeline and bare runs alternate over --rounds rounds (each sees the same shared-machine load); the ratio is
total bare time / total pipeline time. Target: pipeline throughput >= 90% of bare.
Results: benchmarks/results/embed.json and embed.md.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import torch
import yaml

HERE = Path(__file__).resolve().parent
REPO = HERE.parent


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="256 images")
    ap.add_argument("--n", type=int, default=None)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--batch-size", type=int, default=None)
    ap.add_argument("--workers", type=int, default=None)
    ap.add_argument("--rounds", type=int, default=None, help="alternating pipeline/bare rounds (default 3, quick 1)")
    args = ap.parse_args()
    from dinoflow import paths
    from dinoflow.data import ingest, preprocess
    from dinoflow.data.store import ImageStore
    from dinoflow.data.synthetic import make_tiny_collection
    from dinoflow.data.transforms import EvalTransform, Normalize
    from dinoflow.evaluate.embed import EncodedImages, default_workers, embed_dataset
    from dinoflow.models.factory import create_encoder
    from dinoflow.utils import resolve_device

    n = args.n or (256 if args.quick else 2048)
    args.rounds = args.rounds or (1 if args.quick else 3)
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    device = resolve_device(args.device)
    batch = args.batch_size or (256 if device.type == "cuda" else int(params["embed"]["batch_size"]))
    cwd = os.getcwd()
    with tempfile.TemporaryDirectory() as tmp:
        coll = make_tiny_collection(Path(tmp) / "collection", n=n, size=256, seed=0)
        p = copy.deepcopy(params)
        p["collection"] = coll
        p["demo"]["enabled"] = False
        os.chdir(tmp)
        try:
            ingest.main(p)
            preprocess.main(p)
            store = ImageStore(paths.PROCESSED_DIR)
            encoder, info = create_encoder(p, "random")
            cfg = encoder.data_config
            # workers as `dinoflow embed` picks them for a real-sized collection (tiny ones run in process)
            workers = args.workers if args.workers is not None else default_workers(10**9, batch, device)
            dataset = EncodedImages(store, range(len(store)), EvalTransform(cfg))
            norm = Normalize(cfg).to(device)
            encoder = encoder.to(device).eval()
            amp = device.type == "cuda"
            # warm-up (allocator, kernels, page cache of the shards) so neither side pays first-call costs
            embed_dataset(encoder, torch.utils.data.Subset(dataset, range(min(len(dataset), 2 * batch))), norm,
                          batch, device, 0, amp, progress=False)
            # bare forward: the same batches, preprocessed beforehand and resident on the device
            batches = []
            for s in range(0, len(dataset), batch):
                x = torch.stack([dataset[i][0] for i in range(s, min(s + batch, len(dataset)))])
                batches.append(norm(x.to(device)))

            def pipeline() -> float:
                t0 = time.perf_counter()
                embed_dataset(encoder, dataset, norm, batch, device, workers, amp, progress=False)
                if device.type == "cuda":
                    torch.cuda.synchronize()
                return time.perf_counter() - t0

            @torch.no_grad()
            def bare() -> float:
                t0 = time.perf_counter()
                for x in batches:
                    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
                        out = encoder.embed(x)
                    out["cls"].float().cpu()
                if device.type == "cuda":
                    torch.cuda.synchronize()
                return time.perf_counter() - t0

            # alternate the two so that both see the same (shared, fluctuating) machine load
            rounds = [(pipeline(), bare()) if r % 2 == 0 else tuple(reversed((bare(), pipeline())))
                      for r in range(args.rounds)]
        finally:
            os.chdir(cwd)
    t_pipe = sum(r[0] for r in rounds)
    t_bare = sum(r[1] for r in rounds)
    ratios = [b / p for p, b in rounds]
    res = {"n_images": n, "batch_size": batch, "workers": workers, "device": str(device), "bf16": amp,
           "arch": info["arch"], "input_size": list(cfg["input_size"]), "timm_kwargs": info.get("timm_kwargs"),
           "rounds": len(rounds), "round_seconds_pipeline_bare": rounds,
           "pipeline_seconds": t_pipe, "bare_seconds": t_bare,
           "pipeline_images_per_s": n * len(rounds) / t_pipe, "bare_images_per_s": n * len(rounds) / t_bare,
           "pipeline_over_bare_throughput_ratio": t_bare / t_pipe, "round_ratios": ratios,
           "median_round_ratio": float(sorted(ratios)[len(ratios) // 2]), "target_ratio": 0.9,
           "decode": "torchvision.io.decode_image (EncodedImages)",
           "torch_threads": torch.get_num_threads(), "cpu_count": os.cpu_count(), "loadavg_at_end": os.getloadavg()}
    name = "embed_quick" if args.quick else "embed"
    (HERE / "results").mkdir(exist_ok=True)
    (HERE / "results" / f"{name}.json").write_text(json.dumps(res, indent=2) + "\n")
    md = f"""# Embedding throughput: pipeline vs bare forward ({'quick' if args.quick else 'full'})

`OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', '')} python benchmarks/bench_embed.py {' '.join(sys.argv[1:])}`
on {device} ({os.cpu_count()} shared CPU cores, load average at the end {os.getloadavg()[0]:.1f});
{info['arch']} {info.get('timm_kwargs')} at {cfg['input_size'][1]} px, batch {batch}, {workers} DataLoader workers.

| | images/s |
|---|---|
| pipeline (decode + transform + forward) | {res['pipeline_images_per_s']:.1f} |
| bare forward on the same batches | {res['bare_images_per_s']:.1f} |
| ratio (target >= 0.90), all rounds | {t_bare / t_pipe:.3f} |
| ratio per round ({len(rounds)} alternating rounds) | {', '.join(f'{r:.3f}' for r in ratios)} |

Decode: torchvision.io (libwebp straight to a uint8 tensor, `dinoflow.evaluate.embed.EncodedImages`);
resize + crop: torch's uint8 antialiased bicubic in the DataLoader worker(s); normalise per batch.
"""
    (HERE / "results" / f"{name}.md").write_text(md)
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
