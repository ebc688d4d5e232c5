"""The one `dinoflow` command: one sub-command per workflow stage.

Every stage is `main(params, **options)` in its own module, imported only when that stage runs so that
`dinoflow --help` stays fast. Each Snakemake rule (and so each DVC stage) calls exactly one sub-command.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys

# OpenMP (PyTorch's intra-op threads, BLAS) threads sleep between parallel regions instead of spin-waiting. On a
# machine where other work runs (two Snakemake jobs, a test suite), a spinning team waits for a descheduled thread:
# measured on 2 cores at load ~3, a Barlow Twins step with 2 threads took 8.5 s with the default (spinning) and
# 1.9 s with PASSIVE (1.4 s with 1 thread). Set before torch is imported; an explicit OMP_WAIT_POLICY wins.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
from dataclasses import dataclass, field

from dinoflow.config import DEFAULT_PARAMS, load_params
from dinoflow.errors import DinoflowError


@dataclass(frozen=True)
class Stage:
    name: str
    target: str  # "module:function"
    help: str
    options: tuple[tuple[str, dict], ...] = field(default_factory=tuple)


MODEL_OPT = ("--model", {"required": True, "help": "model name from the `models` list in params.yaml"})

STAGES: tuple[Stage, ...] = (
    Stage("demo-collection", "dinoflow.data.demo:main",
          "Build the embedded demo collection (Fluent emoji 3D + emojibase captions) with `npm pack`."),
    Stage("ingest", "dinoflow.data.ingest:main",
          "Validate every metadata row and image; write data/interim/manifest.parquet with a status per row."),
    Stage("preprocess", "dinoflow.data.preprocess:main",
          "Convert ok images to RGB at 256 px (crop or pad) into Parquet shards under data/processed/."),
    Stage("lr-search", "dinoflow.train.lr_search:main",
          "Optuna search over the learning rate (optionally weight decay, teacher temperature) for scratch training."),
    Stage("train", "dinoflow.train.run:main",
          "Materialise or train one model of the list (random, pretrained, DINO from scratch, partial fine-tunes).",
          (MODEL_OPT,)),
    Stage("embed", "dinoflow.evaluate.embed:main",
          "CLS and mean-patch embeddings of every ok image for one model, to Parquet.", (MODEL_OPT,)),
    Stage("neighbours", "dinoflow.evaluate.neighbours:main",
          "Cosine top-k neighbours of every image for one model (exact blocked search, FAISS above a size).",
          (MODEL_OPT,)),
    Stage("grids", "dinoflow.report.grids:main",
          "Retrieval comparison grids: for each query, one row per model with its top-k neighbours."),
    Stage("attention", "dinoflow.report.attention:main",
          "Last-layer CLS attention maps per head (ViTs) or feature-norm saliency (CNNs) for the query images."),
    Stage("groups", "dinoflow.evaluate.groups:main",
          "Near-duplicate groups (collection.group_column, or perceptual-hash components) that no split may cut."),
    Stage("embed-text", "dinoflow.evaluate.text:main",
          "Sentence-transformer embeddings of captions and keyword descriptors, to Parquet."),
    Stage("align", "dinoflow.evaluate.align:main",
          "Spearman (exact or sampled), Mantel p-value and tie-aware mutual-kNN between image and text similarity "
          "for one model; per-image results for compare.", (MODEL_OPT,)),
    Stage("probes", "dinoflow.evaluate.probes:main",
          "Weighted kNN and linear probes (top-1/top-5, C by grouped CV) on the label columns for one model, on a "
          "grouped split; per-image results for compare.", (MODEL_OPT,)),
    Stage("compare", "dinoflow.evaluate.compare:main",
          "95% bootstrap intervals over images for every metric and model, and paired differences between models."),
    Stage("report", "dinoflow.report.html:main",
          "Write reports/index.html (self-contained) and reports/metrics.json."),
    Stage("prepare-run", "dinoflow.workflow.run_dir:main",
          "Write a run folder's params.yaml (params.yaml + an overlay, e.g. the method comparison) and link the "
          "project's data into it; then `snakemake --directory <dir>`.",
          (("--overlay", {"required": True, "help": "YAML merged over params.yaml (mappings merge, lists replace)"}),
           ("--dir", {"required": True, "help": "the run folder (its own params.yaml and outputs)"}),
           ("--set", {"action": "append", "default": [], "metavar": "KEY.PATH=VALUE",
                      "help": "one more override after the overlay, value parsed as YAML (repeatable)"}))),
    Stage("export-dvc", "dinoflow.workflow.export_dvc:main",
          "Generate dvc.yaml from the Snakemake DAG (one DVC stage per rule and model)."),
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dinoflow", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="stage", metavar="<stage>", required=True)
    for stage in STAGES:
        text = stage.help.replace("%", "%%")  # argparse formats help strings with %-style placeholders
        p = sub.add_parser(stage.name, help=text, description=text)
        p.add_argument("--params", default=DEFAULT_PARAMS, help="parameter file (default: %(default)s)")
        for flag, kwargs in stage.options:
            p.add_argument(flag, **kwargs)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    stage = next(s for s in STAGES if s.name == args.stage)
    module_name, func_name = stage.target.split(":")
    func = getattr(importlib.import_module(module_name), func_name)
    options = {k: v for k, v in vars(args).items() if k not in ("stage", "params")}
    try:
        params = load_params(args.params)
        func(params, **options)
    except DinoflowError as exc:
        print(f"dinoflow {stage.name}: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
