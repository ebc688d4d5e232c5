# Evaluation stages, per model: embeddings, neighbours, image-text alignment, probes; text embeddings once.

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


rule align:
    """Spearman / Mantel / mutual-kNN between image and text similarity, per text field."""
    input:
        paths.embeddings("{model}"),
        [paths.text_embeddings(f) for f in TEXT_FIELDS],
    output:
        metric(paths.align_metrics("{model}")),
    params:
        **sections("seed", "neighbours", "align"),
    log:
        model_log("align"),
    conda:
        ENV
    threads: 2
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
    output:
        metric(paths.probe_metrics("{model}")),
    params:
        **sections("seed", "collection", "probes"),
    log:
        model_log("probes"),
    conda:
        ENV
    threads: 2
    resources:
        mem_mb=8000,
        runtime=60,
    shell:
        "dinoflow probes --model {wildcards.model} > {log} 2>&1"
