# Data stages: the demo collection (when enabled), ingest, preprocessing to 256 px shards.

COLLECTION = config["collection"]
DEMO = config["demo"]

if DEMO["enabled"]:

    # Downloads with npm: run it on the submitting host (compute nodes are often offline).
    localrules:
        demo_collection,

    rule demo_collection:
        """Build the embedded demo collection with `npm pack` (pinned packages, checksums recorded)."""
        output:
            metadata=f"{DEMO['out_dir']}/metadata.csv",
            images=directory(f"{DEMO['out_dir']}/images"),
            sources=f"{DEMO['out_dir']}/SOURCES.json",  # pinned specs, checksums, licences
        params:
            **sections("demo"),
        log:
            f"{LOG}/demo_collection.log",
        conda:
            ENV
        resources:
            mem_mb=2000,
            runtime=30,
        shell:
            "dinoflow demo-collection > {log} 2>&1"


def image_listing(wildcards):
    """The image folder's listing (path, size, mtime of every file), rewritten while the DAG is built only when
    it changed: Snakemake compares mtimes, and an image replaced in place under the same name leaves the folder's
    mtime alone, so depending on the folder alone would never re-run ingest (DVC hashes the folder itself; the
    flag keeps this file out of dvc.yaml)."""
    from dinoflow.data.collection import update_image_listing

    return flag(update_image_listing(COLLECTION["images_dir"], paths.IMAGE_LISTING), "snakemake_only")


rule ingest:
    """Validate every metadata row and image; the manifest gives each row a status."""
    input:
        metadata=COLLECTION["metadata"],
        images=COLLECTION["images_dir"],
        listing=image_listing,
    output:
        manifest=paths.MANIFEST,
        summary=metric(paths.INGEST_SUMMARY),
    params:
        **sections("collection", "ingest"),
    log:
        f"{LOG}/ingest.log",
    conda:
        ENV
    threads: 1
    resources:
        mem_mb=4000,
        runtime=60,
    shell:
        # the log gets the log lines (stderr); the one-line summary of kept / skipped rows (stdout) is shown
        "dinoflow ingest 2> {log}"


rule preprocess:
    """RGB, short side to `size`, crop or pad, encoded into Parquet shards."""
    input:
        manifest=paths.MANIFEST,
        images=COLLECTION["images_dir"],
    output:
        images=directory(paths.PROCESSED_DIR),
        index=paths.PROCESSED_INDEX,
    params:
        **sections("collection", "preprocess"),
    log:
        f"{LOG}/preprocess.log",
    conda:
        ENV
    threads: 8
    resources:
        mem_mb=8000,
        runtime=120,
    shell:
        "dinoflow preprocess > {log} 2>&1"
