# dinoflow: the single source of truth for the workflow DAG.
#
#   snakemake --cores 2                                   # run everything on this machine
#   snakemake --profile workflow/profiles/slurm           # submit every job to SLURM
#   dinoflow export-dvc && dvc repro                      # the same DAG through DVC (dvc.yaml is generated)
#
# params.yaml is the config; each rule calls one `dinoflow <stage>` command and declares as `params:` exactly the
# params.yaml sections (or, for the lr search, the dotted keys) that stage reads, so editing a parameter re-runs
# exactly those rules (and what depends on their outputs). Output paths come from dinoflow.paths so they are spelled in one place.

from snakemake.utils import min_version, validate

min_version("8.10")

configfile: "params.yaml"

report: "workflow/report/workflow.rst"


# set_default=False: the config must stay equal to params.yaml (common.smk checks); the stages fill the schema's
# defaults themselves when they parse their sections (dinoflow.config.with_defaults).
validate(config, "workflow/schemas/params.schema.yaml", set_default=False)


include: "workflow/rules/common.smk"
include: "workflow/rules/data.smk"
include: "workflow/rules/train.smk"
include: "workflow/rules/evaluate.smk"
include: "workflow/rules/report.smk"


# Cheap steps run on the submitting host even under the SLURM profile.
localrules:
    all,
    grids,
    report,


rule all:
    input:
        paths.REPORT_HTML,
        paths.REPORT_METRICS,
