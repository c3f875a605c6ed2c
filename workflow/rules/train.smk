# Training: one DiT/SiT (+ ReDi) run per entry of `runs:`, on the shared latents and PCA maps.


rule train:
    input:
        unpack(
            checked(
                "train",
                lambda w: {
                    "latents": f"{stage_dir('encode-latents')}/latents.h5",
                    "features": f"{stage_dir('project-features')}/pca_features.h5",
                },
            )
        ),
    output:
        final=protected(f"{run_pattern('train')}/{FINAL}"),
        manifest=f"{run_pattern('train')}/manifest.json",
    log:
        log_file("train"),
    benchmark:
        benchmark_file("train")
    priority: TRAINING_PRIORITY
    retries: config["launch"]["retries"]
    conda:
        CONDA_ENV
    threads: JOB_THREADS
    resources:
        **job_resources("train"),
        speed=lambda w: speed_flags("train", w.run),
        device=config["device"],
        nproc=config["launch"]["nproc_per_node"],
        retries=config["launch"]["retries"],  # shown by dry runs; the retries directive acts
    params:
        env=train_env(),
        out=output_dir,
        flags=lambda w: cli_flags("train", w.run),
        launcher=launcher,
    shell:
        "{params.env} {params.launcher} train --latents {input.latents:q} --features {input.features:q}"
        " --out {params.out:q} {params.flags} {resources.speed} --device {resources.device:q} > {log:q} 2>&1"
