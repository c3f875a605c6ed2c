# The ReDi workflow: rules live in workflow/rules/, all logic in the `redi` package.
configfile: "config/config.yaml"


include: "workflow/rules/common.smk"
include: "workflow/rules/data.smk"
include: "workflow/rules/features.smk"
include: "workflow/rules/targets.smk"


# The default target. It stays in this file: Snakemake never takes one from an included file.
rule all:
    input:
        rules.encode_latents.output.latents,
        rules.project_features.output.features,
