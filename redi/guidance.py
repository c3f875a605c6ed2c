"""Guidance at sampling time: classifier-free guidance (CFG) and Representation Guidance (RG).

Both are written as corrections to the fully conditioned prediction p_c = model(x, z, y):
    CFG: p_c + (w_cfg - 1) * (p_c - model(x, z, null label))   == p_u + w (p_c - p_u)
    RG:  p_c + (w_rg - 1)  * (p_c - model(x, z_t = 0, y))       == p_0 + w (p_c - p_0)
so they compose (both terms added), and each reduces to p_c at w = 1. All needed branches run in
one batched forward. CFG acts on the image channels only by default (the paper's FID setting). RG
acts on the image channels by default (the z-dropped branch's own z prediction is untrained); the
official code (`forward_with_rg`) guides every channel, z included: `rg_all_channels`. CFG can be
limited to a guidance interval of t.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn


@dataclass(frozen=True)
class Guidance:
    """Guidance scales and options; the default (1, 1) is plain conditional sampling."""

    cfg_scale: float = 1.0
    rg_scale: float = 1.0
    cfg_all_channels: bool = False  # False: CFG on the image only
    interval: tuple[float, float] | None = None  # CFG only while t_lo <= t <= t_hi
    cfg_image_channels: int | None = None  # CFG on the first k image channels only (official DiT/SiT: 3)
    rg_all_channels: bool = False  # True: RG on z too (the official code)

    @property
    def uses_cfg(self) -> bool:
        return self.cfg_scale != 1.0

    @property
    def uses_rg(self) -> bool:
        return self.rg_scale != 1.0


def _at_least_fp32(t: torch.Tensor) -> torch.Tensor:
    return t.float() if t.dtype in (torch.float16, torch.bfloat16) else t


def guided_prediction(
    model: nn.Module,
    x: torch.Tensor,
    t: torch.Tensor,
    y: torch.Tensor | None,
    z: torch.Tensor | None,
    guidance: Guidance,
    null_label: int | None = None,
    t_interval: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(x prediction, z prediction) with CFG and/or RG, from one batched forward of 1-3 branches.

    `t_interval` is the time in the units of `guidance.interval` (default: t itself).
    """
    n = x.shape[0]
    xs, ts, ys, zs = [x], [t], [y], [z]
    if guidance.uses_cfg:
        if y is None or null_label is None:
            raise ValueError("classifier-free guidance needs labels and the model's null label")
        xs.append(x), ts.append(t), ys.append(torch.full_like(y, null_label)), zs.append(z)
    if guidance.uses_rg:
        if z is None:
            raise ValueError("Representation Guidance needs a model that generates z")
        xs.append(x), ts.append(t), ys.append(y), zs.append(torch.zeros_like(z))
    pred = model(torch.cat(xs), torch.cat(ts), None if y is None else torch.cat(ys),
                 None if z is None else torch.cat(zs))
    c = x.shape[1]  # guidance acts on the prediction channels; learned-variance channels stay p_c's
    all_x = _at_least_fp32(pred.x)  # guidance arithmetic in fp32, also under bf16 autocast
    out_x = [p[:, :c] for p in all_x.split(n)]
    out_z = _at_least_fp32(pred.z).split(n) if pred.z is not None else None
    px, pz, branch = out_x[0], (out_z[0] if out_z is not None else None), 1
    if guidance.uses_cfg:
        weight = torch.full((n,), guidance.cfg_scale - 1.0, device=x.device, dtype=px.dtype)
        if guidance.interval is not None:
            lo, hi = guidance.interval
            time = t if t_interval is None else t_interval
            weight = torch.where((time >= lo) & (time <= hi), weight, torch.zeros_like(weight))
        weight = weight.view(-1, *[1] * (px.dim() - 1))
        k = guidance.cfg_image_channels or c
        px = torch.cat([px[:, :k] + weight * (out_x[0] - out_x[branch])[:, :k], px[:, k:]], dim=1)
        if guidance.cfg_all_channels and pz is not None:
            pz = pz + weight * (out_z[0] - out_z[branch])
        branch += 1
    if guidance.uses_rg:
        px = px + (guidance.rg_scale - 1.0) * (out_x[0] - out_x[branch])
        if guidance.rg_all_channels and pz is not None:
            pz = pz + (guidance.rg_scale - 1.0) * (out_z[0] - out_z[branch])
    return torch.cat([px, all_x[:n, c:]], dim=1), pz
