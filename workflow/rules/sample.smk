# Sampling: sample.num_samples images from the run's EMA weights (or an official checkpoint).


rule sample:
    input:
        checkpoint=sample_checkpoint(),
        standins=standin_input("latents"),
    output:
        samples=f"{stage_dir('sample')}/samples.npz",
        grid=f"{stage_dir('sample')}/grid.png",
        manifest=manifest("sample"),
    log:
        log_file("sample"),
    benchmark:
        benchmark_file("sample")
    threads: workflow.cores
    resources:
        speed=speed_flags("sample"),
        device=config["device"],
        nproc=config["launch"]["nproc_per_node"],
    params:
        out=output_dir,
        flags=encoder_flags("sample", "latents"),
        code=code_version("sample"),
        launcher=launcher,
    shell:
        "{params.launcher} sample --checkpoint {input.checkpoint} --out {params.out} {params.flags}"
        " {resources.speed} --device {resources.device} > {log} 2>&1"
