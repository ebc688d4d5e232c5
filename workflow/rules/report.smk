# Figures over all models and the report that gathers everything.

# Figures drawn by the report stage (TODO for the lead: move to dinoflow.paths; report/html.py defines it today).
REPORT_FIGURES_DIR = getattr(paths, "REPORT_FIGURES_DIR", "reports/figures/report")
FINETUNES = [m for m in MODELS if is_finetune(m)]


rule grids:
    """Retrieval comparison grids: per query, one row per model with its top-k neighbours."""
    input:
        expand(paths.neighbours("{model}"), model=MODELS),
        manifest=paths.MANIFEST,
        images=paths.PROCESSED_DIR,
        index=paths.PROCESSED_INDEX,
    output:
        plot(directory(paths.GRIDS_DIR)),
    params:
        **sections("seed", "models", "neighbours"),
    log:
        f"{LOG}/grids.log",
    conda:
        ENV
    threads: 1
    resources:
        mem_mb=4000,
        runtime=30,
    shell:
        "dinoflow grids > {log} 2>&1"


rule attention:
    """Last-layer CLS attention per head (ViTs) or feature-norm saliency (CNNs) for the query images."""
    input:
        expand(paths.model_weights("{model}"), model=MODELS),
        expand(paths.model_info("{model}"), model=MODELS),
        manifest=paths.MANIFEST,
        images=paths.PROCESSED_DIR,
        index=paths.PROCESSED_INDEX,
    output:
        plot(directory(paths.ATTENTION_DIR)),
    params:
        **sections("seed", "models", "neighbours", "attention"),
    log:
        f"{LOG}/attention.log",
    conda:
        ENV
    threads: 2
    resources:
        mem_mb=4000,
        runtime=30,
    shell:
        "dinoflow attention > {log} 2>&1"


rule report:
    """The self-contained reports/index.html and reports/metrics.json."""
    input:
        manifest=paths.MANIFEST,
        ingest=paths.INGEST_SUMMARY,
        text=TEXT_METRICS,
        lr_search=(
            [paths.LR_SEARCH_BEST, paths.LR_SEARCH_TRIALS, paths.LR_SEARCH_PLOT]
            if any(uses_lr_search(m) for m in MODELS)
            else []
        ),
        info=expand(paths.model_info("{model}"), model=MODELS),
        train=expand(paths.train_log_dir("{model}") + "/metrics.json", model=DINO_MODELS),
        train_plots=expand(paths.train_log_dir("{model}") + "/plots", model=DINO_MODELS),
        align=expand(paths.align_metrics("{model}"), model=MODELS),
        probes=expand(paths.probe_metrics("{model}"), model=MODELS),
        grids=paths.GRIDS_DIR,
        attention=paths.ATTENTION_DIR,
    output:
        html=paths.REPORT_HTML,
        metrics=metric(paths.REPORT_METRICS),
        figures=plot(directory(REPORT_FIGURES_DIR)),
        finetune=[plot(paths.FINETUNE_CURVES_PLOT)] if FINETUNES else [],
    params:
        **sections("collection", "models", "report"),
    log:
        f"{LOG}/report.log",
    conda:
        ENV
    threads: 1
    resources:
        mem_mb=4000,
        runtime=30,
    shell:
        "dinoflow report > {log} 2>&1"
