"""ReDi: a diffusion transformer that generates image latents jointly with DINOv2 features."""

__version__ = "0.1.0"
