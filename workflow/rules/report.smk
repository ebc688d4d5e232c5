# Figures over all models and the report that gathers everything.

FINETUNES = [m for m in MODELS if is_finetune(m)]


rule grids:
    """Retrieval comparison grids: per query, one row per model with its top-k neighbours."""
    input:
        expand(paths.neighbours("{model}"), model=MODELS),
        manifest=paths.MANIFEST,
        images=paths.PROCESSED_DIR,
        index=paths.PROCESSED_INDEX,
    output:
        report(plot(directory(paths.GRIDS_DIR)), patterns=["query_{name}.png"], caption="../report/grids.rst",
               category="Retrieval grids"),
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
        report(plot(directory(paths.ATTENTION_DIR)), patterns=["query_{name}.png"],
               caption="../report/attention.rst", category="Attention maps"),
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
        text=paths.TEXT_METRICS,
        lr_search=(
            [paths.LR_SEARCH_BEST, paths.LR_SEARCH_TRIALS, paths.LR_SEARCH_PLOT]
            if any(uses_lr_search(m) for m in MODELS)
            else []
        ),
        info=expand(paths.model_info("{model}"), model=MODELS),
        train=expand(paths.train_log_dir("{model}") + "/metrics.json", model=TRAINED_MODELS),
        train_plots=expand(paths.train_log_dir("{model}") + "/plots", model=TRAINED_MODELS),
        align=expand(paths.align_metrics("{model}"), model=MODELS),
        probes=expand(paths.probe_metrics("{model}"), model=MODELS),
        health=expand(paths.health_metrics("{model}"), model=MODELS),
        compare=paths.COMPARE_METRICS,
        groups=paths.GROUPS_SUMMARY,
        grids=paths.GRIDS_DIR,
        attention=paths.ATTENTION_DIR,
    output:
        html=report(paths.REPORT_HTML, caption="../report/index.rst", category="Report"),
        metrics=metric(paths.REPORT_METRICS),
        figures=report(plot(directory(paths.REPORT_FIGURES_DIR)), patterns=["{name}.png"],
                       caption="../report/report_figures.rst", category="Metrics"),
        finetune=(
            [report(plot(paths.FINETUNE_CURVES_PLOT), caption="../report/finetune_curves.rst", category="Training")]
            if FINETUNES
            else []
        ),
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
