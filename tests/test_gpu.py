"""CUDA-only checks (`pytest -m gpu`; benchmarks/gpu_check.sh runs them): bf16 training steps of every
fusion, one-process NCCL DDP, CPU/GPU forward agreement, and batch-independent per-sample sampling."""

from __future__ import annotations

import socket

import pytest
import torch

from redi.config import load_schema, validate_config
from redi.models import build_run
from redi.sample import SamplingModel, generate

CUDA = torch.cuda.is_available()
pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not CUDA, reason="needs a CUDA device (torch sees none)")]
FUSIONS = load_schema()["properties"]["train"]["properties"]["model"]["properties"]["fusion"]["enum"]
SIDE, RANK = 8, 4


def tiny_run(fusion: str, objective: str = "interpolant", seed: int = 0):
    """A 2-block DiT-S-width model on 8x8 latents, built as `redi train` builds it."""
    cfg = validate_config({"dataset": {"name": "gpu"}, "train": {
        "objective": objective, "rank": RANK, "rep_dropout": 0.2,
        "model": {"size": "S", "patch": 2, "depth": 2, "hidden_size": 64, "num_heads": 2, "fusion": fusion}}})
    torch.manual_seed(seed)
    model, objective_fn = build_run(cfg["train"], 10, SIDE, RANK)
    with torch.no_grad():  # away from the zero init, so every path carries signal
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return cfg["train"], model, objective_fn


def batch(n: int, fusion: str, device, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 4, SIDE, SIDE, generator=g)
    z = torch.randn(n, RANK, SIDE // 2, SIDE // 2, generator=g) if fusion != "none" else None
    y = torch.randint(0, 10, (n,), generator=g)
    return x.to(device), None if z is None else z.to(device), y.to(device)


def train_batch(n: int, fusion: str, seed: int = 0) -> dict:
    """A batch as TrainingData.next_batch gives it on the GPU (posterior mean/std, z, labels, index)."""
    x, z, y = batch(n, fusion, "cuda", seed)
    z = z if z is not None else torch.zeros(n, RANK, SIDE // 2, SIDE // 2, device="cuda")
    return {"mean": x, "std": 0.05 * torch.ones_like(x), "z": z, "y": y, "index": torch.arange(n)}


@pytest.mark.parametrize("fusion", FUSIONS)
def test_bf16_training_step_is_finite_and_moves_the_weights(fusion):
    """redi.train's own step on CUDA: bf16 autocast (precision auto), fused AdamW, flags read later."""
    from redi.train import TrainStep, new_training

    cfg = validate_config({"dataset": {"name": "gpu"}, "train": {
        "rank": RANK, "rep_dropout": 0.2, "grad_clip": 1.0,
        "model": {"size": "S", "patch": 2, "depth": 2, "hidden_size": 64, "num_heads": 2, "fusion": fusion}}})
    model, ema, opt, objective = new_training(cfg["train"], 10, SIDE, torch.device("cuda"))
    step = TrainStep(model, ema, opt, objective, cfg["train"], torch.device("cuda"), 0.18215)
    assert step.bf16 and step.on_device_skip and step.check_every > 1
    trained = [p for p in model.parameters() if p.requires_grad]  # not the fixed sin-cos position table
    before = [p.detach().clone() for p in trained]
    for number in range(1, 4):
        losses = step(train_batch(16, fusion, seed=number), number)
    step.check()  # raises NonFiniteStep naming the step if any was not finite
    assert torch.isfinite(losses["loss"]) and torch.isfinite(losses["grad_norm"])
    moved = sum(not torch.equal(a, p.detach()) for a, p in zip(before, trained, strict=True))
    assert moved == len(before)


def test_a_non_finite_batch_is_skipped_on_the_gpu_and_named_at_the_check():
    from redi.train import NonFiniteStep, TrainStep, new_training

    cfg = validate_config({"dataset": {"name": "gpu"}, "train": {
        "rank": RANK, "model": {"size": "S", "patch": 2, "depth": 2, "hidden_size": 64, "num_heads": 2}}})
    model, ema, opt, objective = new_training(cfg["train"], 10, SIDE, torch.device("cuda"))
    step = TrainStep(model, ema, opt, objective, cfg["train"], torch.device("cuda"), 0.18215)
    step(train_batch(8, "merged", seed=1), 1)
    before = [p.detach().clone() for p in model.parameters()] + [p.clone() for p in ema.parameters()]
    bad = train_batch(8, "merged", seed=2)
    bad["mean"][0, 0, 0, 0] = float("nan")
    step(bad, 2)
    after = [p.detach() for p in model.parameters()] + list(ema.parameters())
    assert all(torch.equal(a, b) for a, b in zip(before, after, strict=True))
    with pytest.raises(NonFiniteStep, match="at step 2,"):
        step.check()


@pytest.mark.parametrize("fusion", ["none", "merged"])
def test_gpu_forward_agrees_with_cpu(fusion):
    _, model, _ = tiny_run(fusion)
    model.eval()
    x, z, y = batch(4, fusion, "cpu")
    t = torch.linspace(0.1, 0.9, 4)
    with torch.no_grad():
        ref = model(x, t, y, z)
        model.cuda()
        old_tf32 = torch.backends.cuda.matmul.allow_tf32
        torch.backends.cuda.matmul.allow_tf32 = False
        try:
            fp32 = model(x.cuda(), t.cuda(), y.cuda(), None if z is None else z.cuda())
        finally:
            torch.backends.cuda.matmul.allow_tf32 = old_tf32
        with torch.autocast("cuda", dtype=torch.bfloat16):
            bf16 = model(x.cuda(), t.cuda(), y.cuda(), None if z is None else z.cuda())
    ref, fp32, bf16 = ([t for t in o if t is not None] for o in (ref, fp32, bf16))  # x, z
    for r, a, b in zip(ref, fp32, bf16, strict=True):
        torch.testing.assert_close(a.float().cpu(), r, rtol=1e-4, atol=1e-4)
        scale = r.abs().max().item()
        assert (b.float().cpu() - r).abs().max().item() <= 3e-2 * scale  # bf16: 8 mantissa bits


@pytest.mark.parametrize("sampler", ["sde", "ode-euler"])
def test_per_sample_seeds_give_the_same_images_for_any_batch_size(sampler):
    _, model, _ = tiny_run("merged")
    sm = SamplingModel(model.cuda().eval(), "interpolant", 10, None, torch.ones(RANK), "tiny")
    cfg = validate_config({"dataset": {"name": "gpu"}, "sample": {
        "sampler": sampler, "steps": 8, "cfg_scale": 1.5, "rg_scale": 1.5, "seed": 3}})["sample"]
    indices = list(range(6))
    whole = generate(sm, indices, cfg, torch.device("cuda"))
    for size in (1, 4):
        parts = [generate(sm, indices[i:i + size], cfg, torch.device("cuda")) for i in range(0, 6, size)]
        for k, name in ((0, "latents"), (1, "z"), (2, "labels")):
            joined = torch.cat([p[k] for p in parts])
            torch.testing.assert_close(joined, whole[k], rtol=1e-4, atol=1e-4, msg=f"{name}, batch {size}")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_one_process_nccl_ddp_matches_plain_gradients(monkeypatch):
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    for key, value in {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(_free_port()), "RANK": "0",
                       "WORLD_SIZE": "1", "LOCAL_RANK": "0"}.items():
        monkeypatch.setenv(key, value)
    dist.init_process_group("nccl", init_method="env://", device_id=torch.device("cuda", 0))
    try:
        _, model, objective = tiny_run("merged")
        model.cuda()
        trained = [p for p in model.parameters() if p.requires_grad]
        plain = [p.detach().clone() for p in trained]
        ddp = DistributedDataParallel(model, device_ids=[0])
        x, z, y = batch(8, "merged", "cuda")
        torch.manual_seed(1)
        objective.loss(ddp, x, z, y)["loss"].backward()
        ddp_grads = [p.grad.clone() for p in trained]
        model.zero_grad(set_to_none=True)
        torch.manual_seed(1)
        objective.loss(model, x, z, y)["loss"].backward()
        for g_ddp, p in zip(ddp_grads, trained, strict=True):
            torch.testing.assert_close(g_ddp, p.grad, rtol=1e-5, atol=1e-6)
        total = torch.ones(3, device="cuda")
        dist.all_reduce(total)
        assert total.tolist() == [1.0, 1.0, 1.0]
        assert all(torch.equal(a, p.detach()) for a, p in zip(plain, trained, strict=True))  # DDP copies none
    finally:
        dist.destroy_process_group()
