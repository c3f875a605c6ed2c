# Evaluation (ADM protocol): the TF-Inception, reference statistics, and metrics of the samples.


rule convert_inception:
    output:
        weights=inception_weights(),
        manifest=manifest("convert-inception"),
    log:
        log_file("convert-inception"),
    conda:
        CONDA_ENV
    shell:
        "redi convert-inception --out {output.weights:q} > {log:q} 2>&1"


rule reference_stats:
    input:
        source=reference_source(),
        inception=inception_input(),
    output:
        reference=f"{stage_dir('reference-stats')}/reference.npz",
        manifest=manifest("reference-stats"),
    log:
        log_file("reference-stats"),
    benchmark:
        benchmark_file("reference-stats")
    conda:
        CONDA_ENV
    threads: JOB_THREADS
    resources:
        **job_resources("reference_stats"),
        speed=speed_flags("reference-stats"),
        device=config["device"],
    params:
        env=gpu_env("reference_stats"),
        flags=inception_flags("reference-stats"),
    shell:
        "{params.env} redi reference-stats --source {input.source:q} --out {output.reference:q} {params.flags}"
        " {resources.speed} --device {resources.device:q} > {log:q} 2>&1"


rule evaluate:
    input:
        unpack(
            checked(
                "evaluate",
                lambda w: {
                    "reference": rules.reference_stats.output.reference,
                    "samples": f"{stage_dir('sample', w.run)}/samples.npz",
                    "inception": inception_input(),
                },
            )
        ),
    output:
        metrics=f"{RESULTS}/{DATASET}/samples/{{run}}/{{sversion}}/metrics-{{version}}.json",
    log:
        log_file("evaluate"),
    benchmark:
        benchmark_file("evaluate")
    conda:
        CONDA_ENV
    threads: JOB_THREADS
    resources:
        **job_resources("evaluate"),
        speed=lambda w: speed_flags("evaluate", w.run),
        device=config["device"],
    params:
        env=gpu_env("evaluate"),
        flags=lambda w: inception_flags("evaluate", w.run),
    shell:
        "{params.env} redi evaluate --reference {input.reference:q} --samples {input.samples:q} --out {output.metrics:q}"
        " {params.flags} {resources.speed} --device {resources.device:q} > {log:q} 2>&1"


rule report:
    input:
        metrics=all_metrics(),
    output:
        table=f"{stage_dir('report')}/tables.md",
        html=report(
            f"{stage_dir('report')}/tables.html",
            caption="../report/tables.rst",
            category="Results",
            labels={"result": "results tables"},
        ),
        csv=f"{stage_dir('report')}/runs.csv",
        latex=f"{stage_dir('report')}/tables.tex",
        grids=report(
            f"{stage_dir('report')}/grids.png",
            caption="../report/grids.rst",
            category="Samples",
            labels={"result": "sample grids"},
        ),
        fid_steps=report(
            f"{stage_dir('report')}/fid_vs_step.png",
            caption="../report/fid_vs_step.rst",
            category="Results",
            labels={"result": "FID vs training step"},
        ),
        fid_spread=report(
            f"{stage_dir('report')}/fid_by_run.png",
            caption="../report/fid_by_run.rst",
            category="Results",
            labels={"result": "FID of every run"},
        ),
        curves=report(
            f"{stage_dir('report')}/training.png",
            caption="../report/training.rst",
            category="Training",
            labels={"result": "training curves"},
        ),
    log:
        log_file("report"),
    conda:
        CONDA_ENV
    params:
        out=output_dir,
        runs=report_runs(),
    shell:
        "redi report --runs {params.runs} --out {params.out:q} > {log:q} 2>&1"
