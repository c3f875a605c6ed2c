"""Training batches from latents.h5 + pca_features.h5, held in memory per rank.

Each rank loads one contiguous block of samples (1/world of the data), so a node's ranks together
hold the data once; batches are drawn from a seeded per-rank permutation by tensor indexing, with
no per-sample Python work. The sampler's state goes into checkpoints, so a resumed run draws the
same batches. Posterior sampling (mean + std * eps) happens on the device, in the training step.
"""

from __future__ import annotations

import os

import h5py
import numpy as np
import torch

from ..errors import ReDiError
from ..io import require_file


def stream_seed(seed: int, process_rank: int, purpose: str) -> int:
    """Independent 63-bit seeds per (run seed, rank, purpose): data order and noise never share a stream."""
    words = np.random.SeedSequence([seed, process_rank, int.from_bytes(purpose.encode(), "little")])
    return int(words.generate_state(2, dtype=np.uint32).view(np.uint64)[0] >> np.uint64(1))


class TrainingData:
    """Posterior mean/std, PCA maps (first `rank` channels) and labels of this rank's samples."""

    def __init__(
        self,
        latents_path: str | os.PathLike,
        features_path: str | os.PathLike,
        pca_rank: int,
        normalize_z: bool = False,
        flip: bool = True,
        seed: int = 0,
        process_rank: int = 0,
        world_size: int = 1,
    ):
        with h5py.File(require_file(latents_path, "latents file"), "r") as lat, \
                h5py.File(require_file(features_path, "PCA features file"), "r") as feat:
            n, n_features = len(lat["labels"]), len(feat["labels"])
            if n_features != n:
                raise ReDiError(f"{latents_path} has {n} samples but {features_path} has {n_features}")
            if feat["z"].shape[1] < pca_rank:
                raise ReDiError(f"train.rank = {pca_rank} exceeds the {feat['z'].shape[1]} PCA channels of "
                                f"{features_path} (raise pca.rank_max)")
            if flip and not ("mean_flip" in lat and "std_flip" in lat and "z_flip" in feat):
                raise ReDiError("train.flip needs flipped latents and features (latents.flip: true)")
            lo, hi = n * process_rank // world_size, n * (process_rank + 1) // world_size
            labels = lat["labels"][lo:hi]
            if not np.array_equal(labels, feat["labels"][lo:hi]):
                raise ReDiError(f"labels of {latents_path} and {features_path} differ: not the same shards")
            views = ["", "_flip"] if flip else [""]
            self.mean = torch.stack([torch.from_numpy(lat["mean" + v][lo:hi]) for v in views])
            self.std = torch.stack([torch.from_numpy(lat["std" + v][lo:hi]) for v in views])
            self.z = torch.stack([torch.from_numpy(feat["z" + v][lo:hi, :pca_rank]) for v in views])
            self.scaling_factor = float(lat.attrs["scaling_factor"])
            component_std = np.asarray(feat["component_std"][:pca_rank], dtype=np.float32)
            z_scale = component_std if normalize_z else np.ones(pca_rank, dtype=np.float32)
            # the dataset's class count (a subset may lack the last classes); older files: max + 1
            self.num_classes = int(lat.attrs.get("num_classes", lat["labels"][:].max() + 1))
        self.z_scale = torch.from_numpy(np.asarray(z_scale, dtype=np.float32)).view(1, pca_rank, 1, 1)
        self.z_std = torch.from_numpy(component_std / z_scale)  # per-channel std of z as the model sees it
        self.labels = torch.from_numpy(labels.astype(np.int64))
        self.num_views, self.size = len(views), hi - lo
        self.first_index = lo
        self.generator = torch.Generator().manual_seed(stream_seed(seed, process_rank, "data"))
        self.order, self.position = torch.randperm(self.size, generator=self.generator), 0

    def next_batch(self, batch_size: int, device: torch.device | None = None) -> dict[str, torch.Tensor]:
        """The next `batch_size` samples of the shuffled order (reshuffled each epoch), a random view each,
        as float32 on `device` (default CPU; index stays on the CPU).

        On CUDA the rows travel in their stored dtype (float16 at scale: half the bytes) from pinned
        memory without blocking the host, and become float32 (z divided by its scale) on the GPU.
        """
        if self.position + batch_size > self.size:
            self.order, self.position = torch.randperm(self.size, generator=self.generator), 0
            if batch_size > self.size:
                raise ReDiError(f"per-rank batch {batch_size} exceeds this rank's {self.size} samples")
        idx = self.order[self.position : self.position + batch_size]
        self.position += batch_size
        view = torch.randint(0, self.num_views, (batch_size,), generator=self.generator)
        rows = {"mean": self.mean[view, idx], "std": self.std[view, idx], "z": self.z[view, idx],
                "y": self.labels[idx]}
        if device is not None and device.type == "cuda":
            rows = {k: v.pin_memory().to(device, non_blocking=True) for k, v in rows.items()}
        z_scale = self.z_scale if device is None or device.type == "cpu" else self._z_scale_on(device)
        return {"index": idx + self.first_index, "mean": rows["mean"].float(), "std": rows["std"].float(),
                "z": rows["z"].float() / z_scale, "y": rows["y"]}

    def _z_scale_on(self, device: torch.device) -> torch.Tensor:
        """z_scale on a GPU, copied there once (self.z_scale stays on the CPU for CPU batches). Keyed by
        the device asked for: a tensor sent to `cuda` reports `cuda:0`, which compares unequal."""
        if getattr(self, "_z_scale_for", None) != device:
            self._z_scale_for, self._z_scale_there = device, self.z_scale.to(device)
        return self._z_scale_there

    def state_dict(self) -> dict:
        """The sampler's position, for checkpoints."""
        return {"generator": self.generator.get_state(), "order": self.order, "position": self.position}

    def load_state_dict(self, state: dict) -> None:
        """Continue from a checkpointed position."""
        self.generator.set_state(state["generator"])
        self.order, self.position = state["order"], int(state["position"])
