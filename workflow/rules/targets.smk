# Named milestones: `snakemake data` builds the training inputs (latents + PCA feature maps).


rule data:
    input:
        f"{stage_dir('encode-latents')}/latents.h5",
        f"{stage_dir('project-features')}/pca_features.h5",
