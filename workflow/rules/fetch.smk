# Published files the workflow downloads when they are missing (released checkpoints, ADM's
# reference batch): one `redi fetch` per file; a file already in place is never fetched.
FETCHED = fetched_files()

if FETCHED:

    rule fetch:
        output:
            "{fetched}",
        log:
            f"logs/{DATASET}/fetch/{{fetched}}.log",
        wildcard_constraints:
            fetched="|".join(re.escape(path) for path in FETCHED),
        conda:
            CONDA_ENV
        params:
            source=lambda w: FETCHED[w.fetched],
        shell:
            "redi fetch --source {params.source:q} --out {output:q} > {log:q} 2>&1"
