# The ReDi workflow: rules live in workflow/rules/, all logic in the `redi` package.
# Without --configfile it runs config/config.yaml (the offline demo); see workflow/rules/common.smk.


include: "workflow/rules/common.smk"


# Run names of the grid, and the 8-hex version folders (see version() in common.smk).
wildcard_constraints:
    run="|".join(re.escape(name) for name in RUNS),
    version="[0-9a-f]{8}",
    sversion="[0-9a-f]{8}",


include: "workflow/rules/fetch.smk"
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
