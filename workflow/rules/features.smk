# Encoder patch features: a class-balanced sample -> PCA -> every image's low-rank feature map.


rule extract_features:
    input:
        **upstream_manifests("extract-features"),
    output:
        features=f"{stage_dir('extract-features')}/features.h5",
        manifest=manifest("extract-features"),
    log:
        log_file("extract-features"),
    benchmark:
        benchmark_file("extract-features")
    priority: TRAINING_PRIORITY
    conda:
        CONDA_ENV
    threads: max(1, config["features"]["workers"])
    resources:
        **job_resources("extract_features"),
        speed=speed_flags("extract-features"),
        device=config["device"],
    params:
        env=gpu_env("extract_features"),
        flags=encoder_flags("extract-features", "features"),
    shell:
        "{params.env} redi extract-features --shards {input.shard:q} --out {output.features:q} {params.flags}"
        " {resources.speed}"
        " --device {resources.device:q} > {log:q} 2>&1"


if config["pca"]["official"]:

    rule convert_pca:
        input:
            config["pca"]["official"],
        output:
            pca=pca_file(),
            manifest=manifest("convert-pca"),
        log:
            log_file("convert-pca"),
        priority: TRAINING_PRIORITY
        conda:
            CONDA_ENV
        shell:
            "redi convert-pca --official {input:q} --out {output.pca:q} > {log:q} 2>&1"

else:

    rule fit_pca:
        input:
            rules.extract_features.output.features,
        output:
            pca=pca_file(),
            manifest=manifest("fit-pca"),
        log:
            log_file("fit-pca"),
        benchmark:
            benchmark_file("fit-pca")
        priority: TRAINING_PRIORITY
        conda:
            CONDA_ENV
        shell:
            "redi fit-pca --features {input:q} --out {output.pca:q} > {log:q} 2>&1"


rule project_features:
    input:
        shards=manifest("shard"),
        pca=pca_file(),
        standins=standin_input("features"),
    output:
        features=f"{stage_dir('project-features')}/pca_features.h5",
        manifest=manifest("project-features"),
    log:
        log_file("project-features"),
    benchmark:
        benchmark_file("project-features")
    priority: TRAINING_PRIORITY
    conda:
        CONDA_ENV
    threads: max(1, config["features"]["workers"])
    resources:
        **job_resources("project_features"),
        speed=speed_flags("project-features"),
        device=config["device"],
    params:
        env=gpu_env("project_features"),
        flags=encoder_flags("project-features", "features"),
    shell:
        "{params.env} redi project-features --shards {input.shards:q} --pca {input.pca:q} --out {output.features:q}"
        " {params.flags} {resources.speed}"
        " --device {resources.device:q} > {log:q} 2>&1"
