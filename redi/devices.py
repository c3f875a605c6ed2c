"""Torch device selection (a module of its own so light stages need not import the encoders)."""

from __future__ import annotations

import torch


def resolve_device(device: str) -> torch.device:
    """`auto` -> cuda when available, else cpu."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)
