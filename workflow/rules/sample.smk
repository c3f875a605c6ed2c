# Sampling: sample.num_samples images per run, from its EMA weights (or an official checkpoint).


rule sample:
    input:
        unpack(
            checked(
                "sample",
                lambda w: {
                    "checkpoint": sample_checkpoint(w.run),
                    "standins": standin_input("latents"),
                    **oracle_features(w.run),
                },
            )
        ),
    output:
        samples=f"{run_pattern('sample')}/samples.npz",
        grid=f"{run_pattern('sample')}/grid.png",
        manifest=f"{run_pattern('sample')}/manifest.json",
    log:
        log_file("sample"),
    benchmark:
        benchmark_file("sample")
    conda:
        CONDA_ENV
    threads: JOB_THREADS
    resources:
        **job_resources("sample"),
        speed=lambda w: speed_flags("sample", w.run),
        device=config["device"],
        nproc=config["launch"]["nproc_per_node"],
    params:
        env=gpu_env("sample"),
        out=output_dir,
        flags=lambda w: encoder_flags("sample", "latents", w.run),
        launcher=launcher,
        weights=sample_weights,
        features=lambda w: " ".join(
            f"--features {shlex.quote(f)}" for f in oracle_features(w.run).values()
        ),
    shell:
        "{params.env} {params.launcher} sample --checkpoint {params.weights:q} {params.features}"
        " --out {params.out:q} {params.flags} {resources.speed} --device {resources.device:q}"
        " > {log:q} 2>&1"
