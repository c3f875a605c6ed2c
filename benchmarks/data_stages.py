"""Benchmark of ReDi's data stages on this machine: shard, encode-latents, extract-features, fit-pca.

Runs the real `redi` stage functions on the offline demo digits with random-weight stand-in
encoders (speed does not depend on the weights), and measures the peak RAM of fit-pca on synthetic
low-rank 768-d features in a fresh process. CPU only, no network. See benchmarks/README.md.

    python benchmarks/data_stages.py                      # full size: 5,000 images, 200k vectors
    python benchmarks/data_stages.py --per-class 20 --pca-vectors 20000   # a quick smoke run
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from machine import machine_info  # benchmarks/, this script's folder

os.environ["HF_HUB_OFFLINE"] = "1"  # before anything imports huggingface_hub (imports below are lazy)


def demo_standins() -> dict:
    """The stand-in encoder settings of the demo config (config/config.yaml), so both stay in sync."""
    from redi.config import load_config

    return load_config(Path(__file__).resolve().parents[1] / "config" / "config.yaml")["standins"]


PCA_BUDGET_MIB = 1024
MIB = 1 << 20

# Runs in a fresh interpreter and reports its peak RSS (VmHWM). Modes: "fit" runs `redi fit-pca`
# through the CLI's main(); "baseline" only imports the same modules;
# "light" imports only what the PCA maths needs (numpy, h5py, redi.pca), for comparison.
_PCA_CHILD = r"""
import json, resource, sys, time


def status():
    with open("/proc/self/status") as f:
        return {l.split(":")[0]: int(l.split()[1]) for l in f if l.startswith(("VmHWM", "VmRSS"))}


t0 = time.perf_counter()
if sys.argv[1] == "light":
    import h5py, numpy, redi.pca
else:
    import redi.cli, redi.pca
result = {"import_s": time.perf_counter() - t0, "after_import": status()}
if sys.argv[1] == "fit":
    t1 = time.perf_counter()
    assert redi.cli.main(["fit-pca", "--features", sys.argv[2], "--out", sys.argv[3]]) == 0
    result["fit_s"] = time.perf_counter() - t1
    manifest = json.load(open(sys.argv[3].rsplit("/", 1)[0] + "/manifest.json"))
    result["num_vectors"] = manifest["num_vectors"]
result["vmhwm_kib"] = status().get("VmHWM")
result["ru_maxrss_kib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print("BENCH_RESULT " + json.dumps(result), flush=True)
"""


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--per-class", type=int, default=500, help="demo digits per class (10 classes, <= 500)")
    p.add_argument("--image-size", type=int, default=32, help="shard crop size (the demo's)")
    p.add_argument("--shard-size", type=int, default=1000, help="images per tar shard")
    p.add_argument("--workers", type=int, default=2, help="shard Pool / DataLoader worker processes")
    p.add_argument("--batch-size", type=int, default=64, help="images per encoder call")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    p.add_argument("--pca-vectors", type=int, default=200_000, help="synthetic feature vectors for fit-pca")
    p.add_argument("--pca-dim", type=int, default=768, help="feature dimension (768 = DINOv2 ViT-B)")
    p.add_argument("--pca-tokens", type=int, default=256, help="tokens per features.h5 row (16x16 grid)")
    p.add_argument("--pca-rank", type=int, default=16, help="planted rank of the synthetic features")
    p.add_argument("--real-encoders", action="store_true",
                   help="also time SD-VAE (256 px) and DINOv2 ViT-B/14 (224 px) with random weights")
    p.add_argument("--real-images", type=int, default=32, help="images per real encoder")
    p.add_argument("--real-batch-size", type=int, default=8, help="batch size of the real encoders")
    p.add_argument("--skip-images", action="store_true", help="skip demo-data, shard, latents, features")
    p.add_argument("--skip-latents", action="store_true", help="skip encode-latents")
    p.add_argument("--skip-features", action="store_true", help="skip extract-features")
    p.add_argument("--skip-pca", action="store_true", help="skip fit-pca")
    p.add_argument("--out-dir", type=Path, default=None, help="work folder (must be empty; default: temp)")
    p.add_argument("--keep", action="store_true", help="keep the work folder")
    p.add_argument("--json", type=Path, default=None, help="also write the numbers to this JSON file")
    p.add_argument("--quiet", action="store_true", help="no tqdm progress bars (stderr)")
    args = p.parse_args(argv)
    if not 1 <= args.per_class <= 500:
        p.error("--per-class must be in 1..500 (MNIST-5k has 500 digits per class)")
    if args.pca_vectors < 2 or args.pca_rank < 1 or args.pca_rank >= args.pca_dim:
        p.error("need --pca-vectors >= 2 and 1 <= --pca-rank < --pca-dim")
    return args


def timed(fn, *a, **kw):
    start = time.perf_counter()
    out = fn(*a, **kw)
    return out, time.perf_counter() - start


def row(stage: str, images: int, seconds: float, notes: str, **extra) -> dict:
    return {"stage": stage, "images": images, "wall_s": round(seconds, 3),
            "images_per_s": round(images / max(seconds, 1e-9), 2), "notes": notes, **extra}


# ---------------------------------------------------------------- image stages (1-3)


def bench_image_stages(args, work: Path) -> list[dict]:
    import timm
    import torch
    from timm.models import save_for_hf

    from redi.data.demo import write_demo_folder
    from redi.data.shard import write_shards
    from redi.encoders import load_encoder
    from redi.features import extract_features
    from redi.latents import encode_latents
    from redi.standins import build_standin_vae, vit_args

    rows = []
    counts, secs = timed(write_demo_folder, work / "images", args.per_class)
    n = sum(counts.values())
    rows.append(row("demo-data (setup)", n, secs, "write_demo_folder: 32x32 RGB PNG folder"))

    manifest, secs = timed(write_shards, work / "images", work / "shards", args.image_size,
                           args.shard_size, args.workers, num_classes=len(counts))
    if manifest["num_samples"] != n or manifest["skipped"]:
        raise SystemExit(f"shard: expected {n} samples, got {manifest['num_samples']}, "
                         f"skipped {len(manifest['skipped'])}")
    n_shards = len(manifest["shards"])
    loader_workers = min(args.workers, n_shards)
    rows.append(row("shard", n, secs, f"write_shards, Pool({args.workers}), {n_shards} shard(s) "
                    f"of <= {args.shard_size}", shards=n_shards))
    shards = work / "shards" / "manifest.json"

    if not args.skip_latents:
        torch.manual_seed(0)
        cfg = demo_standins()
        vae = build_standin_vae(cfg["vae_channels"], cfg["vae_latent_channels"], args.image_size)
        vae.save_pretrained(work / "standin-vae", safe_serialization=True)
        encoder, load_s = timed(load_encoder, "standin-vae", str(work / "standin-vae"), "cpu")
        out, secs = timed(encode_latents, shards, encoder, work / "latents" / "latents.h5",
                          flip=True, dtype="float16", batch_size=args.batch_size, workers=args.workers)
        rows.append(row(
            "encode-latents", n, secs,
            f"stand-in VAE {cfg['vae_channels']}, flip ON: each image encoded twice "
            f"({2 * n / secs:.1f} encoder passes/s); {loader_workers} loader worker(s)",
            encoder_passes_per_s=round(2 * n / secs, 2), load_s=round(load_s, 3),
            latent_shape=out["latent_shape"], flip=True))

    if not args.skip_features:
        torch.manual_seed(0)
        vit_kwargs = vit_args(demo_standins(), args.image_size, num_classes=10)
        vit = timm.create_model("vit_small_patch8_224", pretrained=False, **vit_kwargs)
        save_for_hf(vit, str(work / "standin-vit"), model_args=vit_kwargs, safe_serialization=True)
        encoder, load_s = timed(load_encoder, "standin-vit", str(work / "standin-vit"), "cpu", grid=4)
        out, secs = timed(extract_features, shards, encoder, work / "features" / "features.h5",
                          sample_images=n, seed=0, dtype="float16", batch_size=args.batch_size,
                          workers=args.workers)
        rows.append(row(
            "extract-features", n, secs,
            f"stand-in ViT d{vit_kwargs['embed_dim']}x{vit_kwargs['depth']}"
            f" p{vit_kwargs['patch_size']}, grid 4 "
            f"(16x{out['dim']} tokens/img), sample = all; {loader_workers} loader worker(s)",
            load_s=round(load_s, 3), tokens_per_image=out["grid"] ** 2, dim=out["dim"]))
    return rows


def bench_real_encoders(args, work: Path) -> list[dict]:
    """Model forward only (no shard decode, no HDF5), random weights, loaded via load_encoder."""
    import timm
    import torch
    from diffusers import AutoencoderKL
    from safetensors.torch import save_file

    from redi.encoders import load_encoder

    torch.manual_seed(0)
    vae = AutoencoderKL(  # the stabilityai/sd-vae-ft-ema architecture
        in_channels=3, out_channels=3, latent_channels=4,
        down_block_types=["DownEncoderBlock2D"] * 4, up_block_types=["UpDecoderBlock2D"] * 4,
        block_out_channels=[128, 256, 512, 512], layers_per_block=2, norm_num_groups=32,
        act_fn="silu", sample_size=256, scaling_factor=0.18215,
    )
    vae.save_pretrained(work / "sd-vae", safe_serialization=True)
    del vae
    vit = timm.create_model("vit_base_patch14_reg4_dinov2", pretrained=False, img_size=224)
    save_file(vit.state_dict(), str(work / "dinov2.safetensors"))
    del vit

    images = torch.randint(0, 256, (args.real_images, 256, 256, 3), dtype=torch.uint8)
    bs = args.real_batch_size
    rows = []
    for name, weights, kw, label, note in [
        ("sd-vae", work / "sd-vae", {}, "real SD-VAE enc, 256px",
         "AutoencoderKL [128,256,512,512] -> 4x32x32; ONE pass (encode-latents w/ flip: half this)"),
        ("dinov2-vitb14-reg4", work / "dinov2.safetensors", {"grid": 16}, "real DINOv2 B/14, 224px",
         "256px uint8 -> bicubic 224 -> 16x16x768 tokens; ONE pass"),
    ]:
        encoder, load_s = timed(load_encoder, name, str(weights), "cpu", **kw)
        encoder(images[: min(bs, 2)])  # warm-up, not timed
        start = time.perf_counter()
        for i in range(0, len(images), bs):
            encoder(images[i : i + bs])
        secs = time.perf_counter() - start
        rows.append(row(label, len(images), secs, f"{note}; random weights, batch {bs}",
                        load_s=round(load_s, 3)))
        del encoder
    return rows


# ---------------------------------------------------------------- fit-pca (4)


def write_synthetic_features(path: Path, rows: int, tokens: int, dim: int, rank: int, seed: int = 0):
    """features.h5 as extract-features writes it (tokens float16 (rows, tokens, dim), index, labels)
    filled chunk by chunk with low-rank + noise vectors; returns what the check needs."""
    import h5py
    import numpy as np

    from redi.io import write_json

    rng = np.random.default_rng(seed)
    lam = 0.8 ** np.arange(rank)  # decaying variances of the planted factors
    loadings = rng.standard_normal((rank, dim)).astype(np.float32)
    signal_var = (lam[:, None] * loadings.astype(np.float64) ** 2).sum(0)
    noise_var = 0.1 * signal_var.mean() / 0.9  # ~90 % of the variance is signal, on average
    scale = rng.uniform(0.5, 3.0, dim).astype(np.float32)  # channels on different scales
    offset = rng.normal(0.0, 2.0, dim).astype(np.float32)  # and with different means
    factors = loadings * np.sqrt(lam)[:, None].astype(np.float32)

    path.parent.mkdir(parents=True, exist_ok=True)
    chunk_rows = min(16, rows)  # the chunking ResumableH5 uses for features.h5
    with h5py.File(path, "w") as f:
        ds = f.create_dataset("tokens", (rows, tokens, dim), dtype="float16",
                              chunks=(chunk_rows, tokens, dim))
        f.create_dataset("index", data=np.arange(rows, dtype=np.int64))
        f.create_dataset("labels", data=np.zeros(rows, dtype=np.int64))
        f.create_dataset("done", data=np.ones(rows, dtype=bool))
        f.attrs.update({"grid": int(math.isqrt(tokens)), "seed": seed, "shards_config_hash": "synthetic"})
        for r0 in range(0, rows, chunk_rows):
            r1 = min(rows, r0 + chunk_rows)
            m = (r1 - r0) * tokens
            x = rng.standard_normal((m, rank), dtype=np.float32) @ factors
            x += rng.standard_normal((m, dim), dtype=np.float32) * np.float32(math.sqrt(noise_var))
            x *= scale
            x += offset
            ds[r0:r1] = x.reshape(r1 - r0, tokens, dim).astype(np.float16)
    # fit-pca hashes the manifest beside its input (it must exist)
    write_json(path.with_name("manifest.json"), {"stage": "extract_features", "synthetic": True,
                                                 "num_images": rows, "dim": dim})
    fraction = signal_var / (signal_var + noise_var)  # per-channel share of signal
    expected = (fraction.sum() + rank * (1 - fraction).mean()) / dim
    std_loadings = loadings / np.sqrt(signal_var + noise_var)  # planted directions, standardised
    return {"expected_ratio_at_rank": float(expected), "planted": std_loadings}


def run_pca_child(mode: str, *paths: Path) -> dict:
    proc = subprocess.run([sys.executable, "-c", _PCA_CHILD, mode, *map(str, paths)],
                          stdout=subprocess.PIPE, text=True, env=os.environ.copy())
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("BENCH_RESULT ")]
    if proc.returncode != 0 or not lines:
        raise SystemExit(f"fit-pca child ({mode}) failed with exit code {proc.returncode}")
    result = json.loads(lines[-1].split(" ", 1)[1])
    # VmHWM belongs to the process's own address space, which exec starts afresh. ru_maxrss does not:
    # Linux carries the pre-exec high-water mark over exec, and subprocess (vfork) execs from this
    # process's address space, so ru_maxrss (and RUSAGE_CHILDREN here) would report this process's
    # own peak whenever it is larger. Kept in the JSON for reference only.
    result["peak_mib"] = result["vmhwm_kib"] / 1024
    return result


def bench_pca(args, work: Path) -> dict:
    import numpy as np

    from redi.pca import load_pca

    tokens, dim, rank = args.pca_tokens, args.pca_dim, args.pca_rank
    rows = -(-args.pca_vectors // tokens)
    features = work / "pca-in" / "features.h5"
    truth, gen_s = timed(write_synthetic_features, features, rows, tokens, dim, rank)

    fit = run_pca_child("fit", features, work / "pca-out" / "pca.npz")
    baseline = run_pca_child("baseline")  # after the fit: same (warm) page cache for shared libraries
    light = run_pca_child("light")
    rss_after_import = fit["after_import"]["VmRSS"] / 1024

    pca = load_pca(work / "pca-out" / "pca.npz")
    cum = np.cumsum(pca["explained_variance_ratio"])
    ev = pca["explained_variance"]
    q1 = pca["components"][:rank].T
    q2, _ = np.linalg.qr(truth["planted"].T)
    cosines = np.linalg.svd(q1.T @ q2, compute_uv=False)
    ratio_ok = abs(cum[rank - 1] - truth["expected_ratio_at_rank"]) < 0.02
    elbow = float(ev[rank - 1] / max(ev[rank], 1e-12))
    check_ok = bool(ratio_ok and elbow > 5 and cosines.min() > 0.98
                    and fit["num_vectors"] == rows * tokens)
    return {
        "num_vectors": rows * tokens, "rows": rows, "tokens": tokens, "dim": dim,
        "file_mib": round(features.stat().st_size / MIB, 1), "write_s": round(gen_s, 2),
        "peak_mib": round(fit["peak_mib"], 1), "baseline_mib": round(baseline["peak_mib"], 1),
        "pca_share_mib": round(fit["peak_mib"] - baseline["peak_mib"], 1),
        "rss_after_import_mib": round(rss_after_import, 1),
        "pca_share_in_process_mib": round(fit["peak_mib"] - rss_after_import, 1),
        "light_baseline_mib": round(light["peak_mib"], 1),
        "fit_s": round(fit["fit_s"], 2), "import_s": round(fit["import_s"], 2),
        "budget_mib": PCA_BUDGET_MIB, "budget_pass": fit["peak_mib"] <= PCA_BUDGET_MIB,
        "planted_rank": rank, "cum_ratio_at_rank": round(float(cum[rank - 1]), 4),
        "expected_ratio_at_rank": round(truth["expected_ratio_at_rank"], 4),
        "cum_ratio_at_rank_plus_8": round(float(cum[min(rank + 7, dim - 1)]), 4),
        "elbow_ev_ratio": round(elbow, 1), "min_subspace_cosine": round(float(cosines.min()), 5),
        "variance_check_pass": check_ok,
        "children": {"fit": fit, "baseline": baseline, "light": light},
    }


# ---------------------------------------------------------------- report


def print_report(result: dict) -> None:
    m, s = result["machine"], result["settings"]
    print("\nredi data-stage benchmark (CPU only)")
    print(f"machine: {m['platform']} | CPUs {m['cpu_count']} (usable {m['cpu_affinity']}) | "
          f"python {m['python']} | torch {m['torch']}, {m['torch_threads']} threads "
          f"({m['torch_interop_threads']} interop) | numpy {m['numpy']}")
    print(f"settings: per_class={s['per_class']} image_size={s['image_size']} "
          f"workers={s['workers']} batch_size={s['batch_size']} shard_size={s['shard_size']}")
    if result["stages"]:
        print(f"\n{'stage':<26}{'images':>8}{'wall s':>10}{'images/s':>11}  notes")
        for r in result["stages"]:
            print(f"{r['stage']:<26}{r['images']:>8}{r['wall_s']:>10.2f}{r['images_per_s']:>11.1f}"
                  f"  {r['notes']}")
    p = result.get("fit_pca")
    if p:
        verdict = "PASS" if p["budget_pass"] else "FAIL"
        check = "OK" if p["variance_check_pass"] else "FAILED"
        print(f"\nfit-pca: {p['num_vectors']:,} vectors x {p['dim']} ({p['rows']} rows x {p['tokens']} "
              f"tokens, float16, {p['file_mib']} MiB file written in {p['write_s']} s)")
        print(f"  peak RSS       {p['peak_mib']:8.1f} MiB  fresh process running `redi fit-pca`")
        print(f"  baseline RSS   {p['baseline_mib']:8.1f} MiB  fresh process that only imported "
              "redi.cli + redi.pca")
        print(f"  PCA's share    {p['pca_share_mib']:8.1f} MiB  peak - baseline; in the fit process itself: "
              f"{p['pca_share_in_process_mib']:.1f} MiB (peak - its RSS after imports, "
              f"{p['rss_after_import_mib']:.1f} MiB)")
        print(f"  light baseline {p['light_baseline_mib']:8.1f} MiB  fresh process importing only numpy + "
              "h5py + redi.pca (what the PCA maths needs; the rest is torch/timm/diffusers)")
        print(f"  wall           {p['fit_s']:8.2f} s    redi fit-pca (imports: {p['import_s']} s)")
        print(f"  budget         {p['budget_mib']:8d} MiB  -> {verdict}")
        print(f"  variance check planted rank {p['planted_rank']}: cumulative ratio "
              f"{p['cum_ratio_at_rank']} (expected {p['expected_ratio_at_rank']}; "
              f"+8 components: {p['cum_ratio_at_rank_plus_8']}), eigenvalue elbow "
              f"{p['elbow_ev_ratio']}x, min subspace cosine {p['min_subspace_cosine']} -> {check}")


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.quiet:
        os.environ["TQDM_DISABLE"] = "1"
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    if args.out_dir is not None:
        args.out_dir.mkdir(parents=True, exist_ok=True)
        if any(args.out_dir.iterdir()):
            raise SystemExit(f"--out-dir {args.out_dir} is not empty")
        work = args.out_dir
    else:
        work = Path(tempfile.mkdtemp(prefix="redi-bench-"))
    result = {"machine": machine_info() | {"cuda_used": False},  # CPU only
              "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
              "stages": []}
    try:
        if not args.skip_images:
            result["stages"] += bench_image_stages(args, work)
        if args.real_encoders:
            result["stages"] += bench_real_encoders(args, work)
        if not args.skip_pca:
            result["fit_pca"] = bench_pca(args, work)
    finally:
        if args.keep:
            print(f"work folder kept: {work}", file=sys.stderr)
        elif args.out_dir is None:
            shutil.rmtree(work, ignore_errors=True)
        else:
            for child in work.iterdir():
                shutil.rmtree(child) if child.is_dir() else child.unlink()
    print_report(result)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    pca = result.get("fit_pca")
    return 1 if pca and not (pca["budget_pass"] and pca["variance_check_pass"]) else 0


if __name__ == "__main__":
    sys.exit(main())
