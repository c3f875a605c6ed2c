# Images -> shards, the demo's images and stand-in encoders, and VAE latents.


rule demo_data:
    output:
        manifest("demo-data"),
    log:
        log_file("demo-data"),
    conda:
        CONDA_ENV
    params:
        out=output_dir,
        flags=cli_flags("demo-data"),
    shell:
        "redi demo-data --out {params.out:q} {params.flags} > {log:q} 2>&1"


rule shard:
    input:
        **upstream_manifests("shard"),
    output:
        manifest("shard"),
    log:
        log_file("shard"),
    benchmark:
        benchmark_file("shard")
    conda:
        CONDA_ENV
    threads: max(1, config["shard"]["workers"])
    resources:
        speed=speed_flags("shard"),
    params:
        root=config["dataset"]["root"] or f"{stage_dir('demo-data')}/images",
        out=output_dir,
        flags=cli_flags("shard"),
    shell:
        "redi shard --input {params.root:q} --out {params.out:q} {params.flags} {resources.speed} > {log:q} 2>&1"


rule train_standin_vae:
    input:
        **upstream_manifests("train-standin-vae"),
    output:
        manifest("train-standin-vae"),
    log:
        log_file("train-standin-vae"),
    benchmark:
        benchmark_file("train-standin-vae")
    priority: TRAINING_PRIORITY
    conda:
        CONDA_ENV
    threads: JOB_THREADS
    params:
        out=output_dir,
        flags=cli_flags("train-standin-vae"),
    shell:
        "redi train-standin-vae --shards {input.shard:q} --out {params.out:q} {params.flags} > {log:q} 2>&1"


rule train_standin_vit:
    input:
        **upstream_manifests("train-standin-vit"),
    output:
        manifest("train-standin-vit"),
    log:
        log_file("train-standin-vit"),
    benchmark:
        benchmark_file("train-standin-vit")
    priority: TRAINING_PRIORITY
    conda:
        CONDA_ENV
    threads: JOB_THREADS
    params:
        out=output_dir,
        flags=cli_flags("train-standin-vit"),
    shell:
        "redi train-standin-vit --shards {input.shard:q} --out {params.out:q} {params.flags} > {log:q} 2>&1"


rule encode_latents:
    input:
        **upstream_manifests("encode-latents"),
    output:
        latents=f"{stage_dir('encode-latents')}/latents.h5",
        manifest=manifest("encode-latents"),
    log:
        log_file("encode-latents"),
    benchmark:
        benchmark_file("encode-latents")
    priority: TRAINING_PRIORITY
    conda:
        CONDA_ENV
    threads: max(1, config["latents"]["workers"])
    resources:
        **job_resources("encode_latents"),
        speed=speed_flags("encode-latents"),
        device=config["device"],
    params:
        env=gpu_env("encode_latents"),
        flags=encoder_flags("encode-latents", "latents"),
    shell:
        "{params.env} redi encode-latents --shards {input.shard:q} --out {output.latents:q} {params.flags}"
        " {resources.speed}"
        " --device {resources.device:q} > {log:q} 2>&1"
