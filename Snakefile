# The ReDi workflow: rules live in workflow/rules/, all logic in the `redi` package.
# Without --configfile it runs config/config.yaml (the offline demo); see workflow/rules/common.smk.


include: "workflow/rules/common.smk"


# Run names of the grid, and the 8-hex version folders (redi/stages.py: Plan.version).
wildcard_constraints:
    run="|".join(re.escape(name) for name in RUNS),
    version="[0-9a-f]{8}",
    sversion="[0-9a-f]{8}",


# Every other rule file, in name order (a new stage's rule file needs no line here; rules refer to
# other files' outputs through stage_dir, never through rules.<name>).
for rule_file in sorted((REPO / "workflow" / "rules").glob("*.smk")):
    if rule_file.name != "common.smk":

        include: rule_file


# The default target stays here: Snakemake ignores default targets set inside included files.
rule all:
    input:
        rules.report.output.table,
