# The ReDi workflow: rules live in workflow/rules/, all logic in the `redi` package.
# Without --configfile it runs config/config.yaml (the offline demo); see workflow/rules/common.smk.


include: "workflow/rules/common.smk"
include: "workflow/rules/data.smk"
include: "workflow/rules/features.smk"
include: "workflow/rules/train.smk"
include: "workflow/rules/sample.smk"
include: "workflow/rules/evaluate.smk"
include: "workflow/rules/targets.smk"


# The default target stays here: Snakemake ignores default targets set inside included files.
rule all:
    input:
        rules.report.output.table,
