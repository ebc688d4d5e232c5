# Evaluation stages, per model: embeddings, neighbours, image-text alignment, probes; text embeddings, near-
# duplicate groups and the comparison of all models once.

TEXT_FIELDS = ("caption", "keywords")


def model_weights_and_info(wildcards):
    return [paths.model_weights(wildcards.model), paths.model_info(wildcards.model)]


rule embed:
    """CLS and mean-patch embeddings of every ok image, to Parquet."""
    input:
        model_weights_and_info,
        manifest=paths.MANIFEST,
        images=paths.PROCESSED_DIR,
        index=paths.PROCESSED_INDEX,
    output:
        paths.embeddings("{model}"),
    params:
        seed=config["seed"],
        models=model_entry,  # the architecture itself comes from the model's info.json
        embed=config["embed"],
    log:
        model_log("embed"),
    conda:
        ENV
    threads: 4
    resources:
        mem_mb=8000,
        runtime=120,
    shell:
        "dinoflow embed --model {wildcards.model} > {log} 2>&1"


rule neighbours:
    """Top-k neighbours of every image under the used similarity (exact float64 blocked search, FAISS above a
    size) and the embedding health (cosine spread, RankMe, degenerate flag)."""
    input:
        paths.embeddings("{model}"),
    output:
        paths.neighbours("{model}"),
        health=metric(paths.health_metrics("{model}")),
    params:
        **sections("seed", "neighbours", "similarity", "health"),
    log:
        model_log("neighbours"),
    conda:
        ENV
    threads: 4
    resources:
        mem_mb=8000,
        runtime=120,
    shell:
        "dinoflow neighbours --model {wildcards.model} > {log} 2>&1"


rule embed_text:
    """Sentence-transformer embeddings of captions and keyword descriptors."""
    input:
        paths.MANIFEST,
    output:
        [paths.text_embeddings(f) for f in TEXT_FIELDS],
        metric(paths.TEXT_METRICS),
    params:
        **sections("seed", "text", "embed"),
    log:
        f"{LOG}/embed_text.log",
    conda:
        ENV
    threads: 4
    resources:
        mem_mb=8000,
        runtime=120,
    shell:
        "dinoflow embed-text > {log} 2>&1"


rule groups:
    """Near-duplicate groups (collection.group_column or perceptual-hash components) kept whole in every split."""
    input:
        index=paths.PROCESSED_INDEX,
        manifest=paths.MANIFEST,
        metadata=[config["collection"]["metadata"]] if config["collection"].get("group_column") else [],
    output:
        groups=paths.GROUPS,
        summary=metric(paths.GROUPS_SUMMARY),
    params:
        **sections("collection", "groups"),
    log:
        f"{LOG}/groups.log",
    conda:
        ENV
    threads: 1
    resources:
        mem_mb=4000,
        runtime=30,
    shell:
        "dinoflow groups > {log} 2>&1"


rule align:
    """Spearman / Mantel / mutual-kNN between image and text similarity, per text field."""
    input:
        paths.embeddings("{model}"),
        [paths.text_embeddings(f) for f in TEXT_FIELDS],
        paths.TEXT_METRICS,
    output:
        metric(paths.align_metrics("{model}")),
        paths.align_items("{model}"),
    params:
        **sections("seed", "align"),
    log:
        model_log("align"),
    conda:
        ENV
    threads: 1  # sequential numpy / scipy (rank sorts, L-BFGS): two 1-thread jobs use 2 cores better than one 2-thread job; profiles raise it (set-threads)
    resources:
        mem_mb=8000,
        runtime=120,
    shell:
        "dinoflow align --model {wildcards.model} > {log} 2>&1"


rule probes:
    """Weighted kNN and linear probes on the label columns."""
    input:
        paths.embeddings("{model}"),
        paths.MANIFEST,
        paths.GROUPS,
    output:
        metric(paths.probe_metrics("{model}")),
        paths.probe_items("{model}"),
    params:
        **sections("seed", "collection", "probes"),
    log:
        model_log("probes"),
    conda:
        ENV
    threads: 1  # sequential numpy / scipy (rank sorts, L-BFGS): two 1-thread jobs use 2 cores better than one 2-thread job; profiles raise it (set-threads)
    resources:
        mem_mb=8000,
        runtime=60,
    shell:
        "dinoflow probes --model {wildcards.model} > {log} 2>&1"


rule compare:
    """Bootstrap 95% intervals over images of every metric and model, and paired differences between models."""
    input:
        expand(paths.probe_metrics("{model}"), model=MODELS),
        expand(paths.probe_items("{model}"), model=MODELS),
        expand(paths.align_metrics("{model}"), model=MODELS),
        expand(paths.align_items("{model}"), model=MODELS),
        expand(paths.embeddings("{model}"), model=MODELS),
        [paths.text_embeddings(f) for f in TEXT_FIELDS],
        paths.GROUPS,
    output:
        metric(paths.COMPARE_METRICS),
    params:
        **sections("seed", "models", "compare"),
    log:
        f"{LOG}/compare.log",
    conda:
        ENV
    threads: 1
    resources:
        mem_mb=4000,
        runtime=30,
    shell:
        "dinoflow compare > {log} 2>&1"
