"""DiT / SiT backbone with ReDi's representation input: the image latent x and PCA features z.

fusion="none" is the plain DiT/SiT (parameter names match the official checkpoints).
fusion="merged" (ReDi-MR): z tokens live on the token grid and are embedded and summed onto the
x tokens, h = patchify(x) W_x + z W_z; two heads read the same output tokens.
fusion="separate" (ReDi-SP): [x tokens ; z tokens] along the sequence, each with the position and
a modality embedding; the x head reads the first half, the z head the second (~2x the compute).
fusion="concat" (the official ReDi code's layout): z is upsampled bilinearly to the latent's
resolution and concatenated to its channels; one patch embedding over C + r channels and one head
of C + r channels (x2 with a learned variance), so its state dict is the official SiT-ReDi one.
Its z state lives at the latent resolution (see `lift_representation`).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from .blocks import DiTBlock, FinalLayer
from .embeddings import LabelEmbedder, PatchEmbed, TimestepEmbedder, sincos_pos_embed_2d

FUSIONS = ("none", "concat", "merged", "separate")


class Prediction(NamedTuple):
    x: torch.Tensor  # (N, C_out, H, W): eps / velocity (and variance values when learn_sigma)
    z: torch.Tensor | None  # (N, r, S, S), S = model.rep_size: the representation's eps / velocity


class DiT(nn.Module):
    """Diffusion transformer with adaLN-Zero conditioning on timestep (+ class label)."""

    def __init__(
        self,
        input_size: int = 32,
        patch_size: int = 2,
        in_channels: int = 4,
        hidden_size: int = 1152,
        depth: int = 28,
        num_heads: int = 16,
        mlp_ratio: float = 4.0,
        class_dropout_prob: float = 0.1,
        num_classes: int = 1000,
        learn_sigma: bool = True,
        fusion: str = "none",
        rep_channels: int = 0,
        grad_checkpointing: bool = False,
    ):
        super().__init__()
        if fusion not in FUSIONS:
            raise ValueError(f"fusion must be one of {FUSIONS}, got {fusion!r}")
        if fusion != "none" and rep_channels < 1:
            raise ValueError(f"fusion={fusion!r} needs rep_channels >= 1")
        self.in_channels, self.patch_size, self.fusion = in_channels, patch_size, fusion
        joint = in_channels + (rep_channels if fusion == "concat" else 0)  # channels of one patch
        self.out_channels = joint * 2 if learn_sigma else joint  # of the x head (with z for concat)
        self.learn_sigma, self.num_classes, self.rep_channels = learn_sigma, num_classes, rep_channels
        self.grad_checkpointing = grad_checkpointing

        self.x_embedder = PatchEmbed(input_size, patch_size, joint, hidden_size)
        self.t_embedder = TimestepEmbedder(hidden_size)
        if num_classes > 0:
            self.y_embedder = LabelEmbedder(num_classes, hidden_size, class_dropout_prob)
        self.grid_size, num_tokens = self.x_embedder.grid_size, self.x_embedder.num_patches
        self.pos_embed = nn.Parameter(torch.zeros(1, num_tokens, hidden_size), requires_grad=False)
        self.blocks = nn.ModuleList(DiTBlock(hidden_size, num_heads, mlp_ratio) for _ in range(depth))
        self.final_layer = FinalLayer(hidden_size, patch_size * patch_size * self.out_channels)
        self.rep_size = input_size if fusion == "concat" else self.grid_size  # side of z's state
        if fusion in ("merged", "separate"):
            self.z_embedder = nn.Linear(rep_channels, hidden_size)
            self.final_layer_z = FinalLayer(hidden_size, rep_channels)
        if fusion == "separate":
            self.modality_embed = nn.Parameter(torch.zeros(2, hidden_size))  # [x, z]
        self.initialize_weights()

    def initialize_weights(self) -> None:
        """DiT's init: xavier linears, N(0, 0.02) embeddings, zeroed modulations and output layers."""

        def basic_init(module):
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                nn.init.zeros_(module.bias)

        self.apply(basic_init)
        pos = sincos_pos_embed_2d(self.pos_embed.shape[-1], self.grid_size)
        self.pos_embed.data.copy_(torch.from_numpy(pos).float().unsqueeze(0))
        w = self.x_embedder.proj.weight.data
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        nn.init.zeros_(self.x_embedder.proj.bias)
        if self.num_classes > 0:
            nn.init.normal_(self.y_embedder.embedding_table.weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[0].weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[2].weight, std=0.02)
        heads = [self.final_layer] + ([self.final_layer_z] if hasattr(self, "final_layer_z") else [])
        for layer in [*self.blocks, *heads]:
            nn.init.zeros_(layer.adaLN_modulation[-1].weight)
            nn.init.zeros_(layer.adaLN_modulation[-1].bias)
        for head in heads:
            nn.init.zeros_(head.linear.weight)
            nn.init.zeros_(head.linear.bias)
        if self.fusion == "separate":
            nn.init.normal_(self.modality_embed, std=0.02)

    def unpatchify(self, tokens: torch.Tensor) -> torch.Tensor:
        """(N, T, p*p*C) -> (N, C, H, W), inverting the row-major patch order."""
        n, g, p, c = tokens.shape[0], self.grid_size, self.patch_size, self.out_channels
        x = tokens.reshape(n, g, g, p, p, c)
        return torch.einsum("nhwpqc->nchpwq", x).reshape(n, c, g * p, g * p)

    def lift_representation(self, z: torch.Tensor) -> torch.Tensor:
        """A PCA map on the token grid (N, r, G, G) -> the model's z state (N, r, rep_size, rep_size).

        concat: bilinear upsampling (align_corners=False), as the official code; else unchanged.
        """
        if z.shape[-1] == self.rep_size:
            return z
        return F.interpolate(z, size=(self.rep_size, self.rep_size), mode="bilinear", align_corners=False)

    def representation_on_grid(self, z: torch.Tensor) -> torch.Tensor:
        """The model's z state -> the token grid (N, r, G, G): the mean over each patch (concat)."""
        if z.shape[-1] == self.grid_size:
            return z
        return F.avg_pool2d(z, self.patch_size)

    def embed(self, x: torch.Tensor, z: torch.Tensor | None) -> torch.Tensor:
        """Input tokens: x patches (+ z as extra channels, z tokens summed, or z tokens appended)."""
        if self.fusion == "none":
            return self.x_embedder(x) + self.pos_embed
        expected = (x.shape[0], self.rep_channels, self.rep_size, self.rep_size)
        if z is None:  # the representation-dropped input: z_t = 0
            z = x.new_zeros(expected)
        elif tuple(z.shape) != expected:
            raise ValueError(f"z must have shape {expected} (N, r, side, side), got {tuple(z.shape)}")
        if self.fusion == "concat":
            return self.x_embedder(torch.cat([x, z.to(x.dtype)], dim=1)) + self.pos_embed
        h = self.x_embedder(x) + self.pos_embed
        hz = self.z_embedder(z.flatten(2).transpose(1, 2))  # (N, T, r) row-major, like the patches
        if self.fusion == "merged":
            return h + hz
        return torch.cat([h + self.modality_embed[0], hz + self.pos_embed + self.modality_embed[1]], 1)

    def condition(self, t: torch.Tensor, y: torch.Tensor | None) -> torch.Tensor:
        c = self.t_embedder(t)
        if self.num_classes > 0:
            if y is None:
                raise ValueError("a class-conditional model needs labels y")
            c = c + self.y_embedder(y, self.training)
        return c

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None = None,
                z: torch.Tensor | None = None) -> Prediction:
        """x: (N, C, H, W) noisy latents; t: (N,) timesteps; y: (N,) labels; z: (N, r, S, S)."""
        h, c = self.embed(x, z), self.condition(t, y)
        num_tokens = self.x_embedder.num_patches
        for block in self.blocks:
            if self.grad_checkpointing and self.training:
                h = checkpoint(block, h, c, use_reentrant=False)
            else:
                h = block(h, c)
        out = self.unpatchify(self.final_layer(h[:, :num_tokens], c))
        if self.fusion == "none":
            return Prediction(out, None)
        if self.fusion == "concat":  # [x, z] (+ [x variance, z variance]); z has no variance of its own
            c_x, joint = self.in_channels, self.in_channels + self.rep_channels
            out_x = out[:, :c_x]
            if self.learn_sigma:
                out_x = torch.cat([out_x, out[:, joint:joint + c_x]], dim=1)
            return Prediction(out_x, out[:, c_x:joint])
        hz = h[:, num_tokens:] if self.fusion == "separate" else h
        out_z = self.final_layer_z(hz, c).transpose(1, 2)
        return Prediction(out, out_z.reshape(x.shape[0], -1, self.grid_size, self.grid_size))
