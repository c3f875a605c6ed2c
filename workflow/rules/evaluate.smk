# Evaluation (ADM protocol): the TF-Inception, reference statistics, and metrics of the samples.


rule convert_inception:
    output:
        weights=inception_weights(),
        manifest=manifest("convert-inception"),
    log:
        log_file("convert-inception"),
    params:
        code=code_version("convert-inception"),
    shell:
        "redi convert-inception --out {output.weights} > {log} 2>&1"


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
    threads: workflow.cores
    resources:
        speed=speed_flags("reference-stats"),
        device=config["device"],
    params:
        flags=inception_flags("reference-stats"),
        code=code_version("reference-stats"),
    shell:
        "redi reference-stats --source {input.source} --out {output.reference} {params.flags}"
        " {resources.speed} --device {resources.device} > {log} 2>&1"


rule evaluate:
    input:
        reference=rules.reference_stats.output.reference,
        samples=rules.sample.output.samples,
        inception=inception_input(),
    output:
        metrics=metrics_file(),
    log:
        log_file("evaluate"),
    benchmark:
        benchmark_file("evaluate")
    threads: workflow.cores
    resources:
        speed=speed_flags("evaluate"),
        device=config["device"],
    params:
        flags=inception_flags("evaluate"),
        code=code_version("evaluate"),
    shell:
        "redi evaluate --reference {input.reference} --samples {input.samples} --out {output.metrics}"
        " {params.flags} {resources.speed} --device {resources.device} > {log} 2>&1"
