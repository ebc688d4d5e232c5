"""Where every stage writes. The Snakefile, `dinoflow export-dvc` and the stage commands all import these,
so a path is spelled in exactly one place. All paths are relative to the workflow root (the cwd)."""

from __future__ import annotations

MANIFEST = "data/interim/manifest.parquet"
INGEST_SUMMARY = "metrics/ingest.json"
IMAGE_LISTING = "data/interim/image_listing.tsv"  # path, size, mtime of every image (Snakemake re-run trigger)
PROCESSED_DIR = "data/processed/images"          # Parquet shards of encoded 256 px images
PROCESSED_INDEX = "data/processed/index.parquet"  # id -> shard, row (one row per ok image)

GROUPS = "data/interim/groups.parquet"            # id -> group (near-duplicate family or collection.group_column)
GROUPS_SUMMARY = "metrics/groups.json"            # how groups were formed, how many near-duplicate groups
COMPARE_METRICS = "metrics/compare.json"          # item-level intervals and paired model differences

LR_SEARCH_DIR = "models/lr_search"
LR_SEARCH_BEST = "models/lr_search/best.json"
LR_SEARCH_TRIALS = "models/lr_search/trials.csv"
LR_SEARCH_PLOT = "reports/figures/lr_search.png"

TEXT_DIR = "text"
TEXT_METRICS = "metrics/text.json"              # counts of rows with / without each text field
FINETUNE_CURVES_PLOT = "reports/figures/finetune_curves.png"
REPORT_HTML = "reports/index.html"
REPORT_METRICS = "reports/metrics.json"


def model_dir(model: str) -> str:
    return f"models/{model}"


def model_weights(model: str) -> str:
    """Backbone weights of a model, safetensors (every model has one, also random and pretrained)."""
    return f"models/{model}/weights.safetensors"


def model_info(model: str) -> str:
    """JSON: model name, arch, init, weights source, stand-in flag, params hash."""
    return f"models/{model}/info.json"


def train_state(model: str) -> str:
    return f"models/{model}/train_state.pt"


def train_log_dir(model: str) -> str:
    """dvclive directory of a model's training (metrics.json, plots/metrics/*.tsv)."""
    return f"metrics/train/{model}"


def embeddings(model: str) -> str:
    return f"embeddings/{model}.parquet"


def neighbours(model: str) -> str:
    return f"neighbours/{model}.parquet"


def text_embeddings(field: str) -> str:
    """field: caption or keywords."""
    return f"text/{field}.parquet"


def align_metrics(model: str) -> str:
    return f"metrics/align/{model}.json"


def probe_metrics(model: str) -> str:
    return f"metrics/probes/{model}.json"


def probe_items(model: str) -> str:
    """Parquet: per test image of each label column, tie-aware kNN / linear correctness at top-1 and top-5."""
    return f"metrics/items/probes/{model}.parquet"


def align_items(model: str) -> str:
    """Parquet: per image of each text field, its tie-aware mutual-kNN overlap."""
    return f"metrics/items/align/{model}.parquet"


def health_metrics(model: str) -> str:
    """JSON: embedding health of a model (spread of pairwise cosines, RankMe, degenerate flag)."""
    return f"metrics/health/{model}.json"


GRIDS_DIR = "reports/figures/grids"
GRID_QUERIES = "reports/figures/grids/queries.json"  # query ids shown in grids and the report
REPORT_FIGURES_DIR = "reports/figures/report"         # figures drawn by the report stage
ATTENTION_DIR = "reports/figures/attention"
