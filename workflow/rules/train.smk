# Training: one DiT/SiT (+ ReDi) run on the latents and PCA feature maps.


rule train:
    input:
        latents=rules.encode_latents.output.latents,
        features=rules.project_features.output.features,
    output:
        final=protected(f"{stage_dir('train')}/final.pt"),
        manifest=manifest("train"),
    log:
        log_file("train"),
    benchmark:
        benchmark_file("train")
    threads: workflow.cores
    resources:
        speed=speed_flags("train"),
        device=config["device"],
        nproc=config["launch"]["nproc_per_node"],
    params:
        out=output_dir,
        flags=cli_flags("train"),
        code=code_version("train"),
        launcher=launcher,
    shell:
        "{params.launcher} train --latents {input.latents} --features {input.features}"
        " --out {params.out} {params.flags} {resources.speed} --device {resources.device} > {log} 2>&1"
