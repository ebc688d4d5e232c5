# Training stages: the learning-rate search for scratch training, then one `train` job per model of the list.
# Models with `method: none` (random, pretrained) only materialise their weights; models with a method (any
# registered SSL method) train on the engine and log with dvclive under metrics/train/<model>. Their outputs
# differ, so they are two rules over the same command.

PROCESSED = [paths.PROCESSED_DIR, paths.PROCESSED_INDEX]


def pretrained_file(wildcards):
    """A local pretrained checkpoint is an input of the models that start from it."""
    pre = config["pretrained"]
    if root_init(wildcards.model) == "pretrained" and pre["source"] == "file" and pre.get("file"):
        return [pre["file"]]
    return []


def init_weights(wildcards):
    """A model initialised from another model of the list starts from that model's weights."""
    init = model_config(config, wildcards.model)["init"]
    return [paths.model_weights(init), paths.model_info(init)] if init not in ("random", "pretrained") else []


def lr_best(wildcards):
    return [paths.LR_SEARCH_BEST] if uses_lr_search(wildcards.model) else []


def train_log(name):
    """One file or folder of a model's dvclive directory."""
    return f"{paths.train_log_dir('{model}')}/{name}"


if any(uses_lr_search(m) for m in MODELS):

    rule lr_search:
        """Optuna (TPE) over the scratch learning rate of the searched method, each trial judged by kNN top-1 (or
        RankMe) on a grouped held-out slice; best values in best.json."""
        input:
            PROCESSED,
            groups=paths.GROUPS,  # trials are judged on a held-out slice of whole groups
            manifest=paths.MANIFEST,  # label columns for the kNN criterion
        output:
            best=paths.LR_SEARCH_BEST,
            trials=plot(paths.LR_SEARCH_TRIALS),
            figure=report(plot(paths.LR_SEARCH_PLOT), caption="../report/lr_search.rst", category="Training"),
        params:
            # exactly what the search reads (not e.g. probes.linear_c_grid): dinoflow.config.lr_search_reads
            **dotted_params(dinoflow_config.lr_search_reads(config)),
        log:
            f"{LOG}/lr_search.log",
        conda:
            ENV
        threads: 4
        resources:
            mem_mb=8000,
            runtime=240,
        shell:
            "dinoflow lr-search > {log} 2>&1"


rule init_model:
    """random / pretrained: save the initial weights as the model (no training)."""
    input:
        pretrained_file,
        init_weights,
    output:
        weights=paths.model_weights("{model}"),
        info=paths.model_info("{model}"),
    wildcard_constraints:
        model="|".join(re.escape(m) for m in PLAIN_MODELS) or "^$",
    params:
        seed=config["seed"],
        models=model_entry,
        backbone=arch_params("backbone"),
        pretrained=arch_params("pretrained"),
    log:
        model_log("train"),
    conda:
        ENV
    threads: 1
    resources:
        mem_mb=4000,
        runtime=30,
    shell:
        "dinoflow train --model {wildcards.model} > {log} 2>&1"


rule train:
    """Self-supervised training of one model with its method: from scratch (lr from the search when the model uses
    it) or a partial fine-tune of existing weights."""
    input:
        PROCESSED,
        pretrained_file,
        init_weights,
        lr_best,
    output:
        weights=paths.model_weights("{model}"),
        info=paths.model_info("{model}"),
        state=paths.train_state("{model}"),
        metrics=metric(train_log("metrics.json")),
        plots=plot(directory(train_log("plots"))),
    wildcard_constraints:
        model="|".join(re.escape(m) for m in TRAINED_MODELS) or "^$",
    params:
        seed=config["seed"],
        models=model_entry,
        backbone=arch_params("backbone"),
        pretrained=arch_params("pretrained"),
        train=config["train"],
        finetune=if_model(is_finetune, "finetune"),
        methods=model_method_section,
    log:
        model_log("train"),
    conda:
        ENV
    threads: 4
    resources:
        mem_mb=16000,
        runtime=24 * 60,
    shell:
        "dinoflow train --model {wildcards.model} > {log} 2>&1"
