"""Per method: parameters, one training step, one inference, at one grid (default 64^3) — printed as a table.

    python benchmarks/method_table.py                       # 3D 64^3, CPU, one thread, paper widths
    python benchmarks/method_table.py --size 128 --device cuda   # on a GPU (bf16 autocast like the loop)
    python benchmarks/method_table.py --methods vantgan icam --size 32

Networks are built with each method's default (paper) configuration unless ``--config method:key=value`` says
otherwise; medXGAN gets a freshly built classifier of the classifier method's default configuration. A training
step is one call of the method's ``training_step`` with one normal + one abnormal image (VA-GAN: a regular step,
i.e. 5 critic updates + 1 generator update, past its warm-up); inference is one ``attribute`` call with the
method's default options (medXGAN: ``--medxgan-inversion-steps``, default 500 as the method). On the CPU the
times are process CPU seconds with one torch thread (robust to other jobs on a shared machine); on CUDA they are
wall seconds after synchronisation. The first step is a warm-up and is not counted unless ``--no-warmup``.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "CounterfactualVA"))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "CounterfactualVATraining"))

from CounterfactualVALib.checkpoint import ModelMetadata, save_model  # noqa: E402
from CounterfactualVALib.methods import TrainingContext, available_methods, create_method, get_method_class  # noqa: E402
from CounterfactualVALib.preprocessing import PreprocessingConfig  # noqa: E402


def _clock(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        return time.perf_counter()
    return time.process_time()


def _classifier_file(folder: Path, spatial_dims: int, size: list[int]) -> Path:
    clf = create_method("classifier", spatial_dims)
    metadata = ModelMetadata(
        method="classifier",
        method_config=clf.config,
        preprocessing=PreprocessingConfig(spatial_dims=spatial_dims, size=size, spacing=[1.0] * spatial_dims, crop="image", intensity="minmax").to_dict(),
        networks=list(clf.inference_networks),
        outputs=list(clf.outputs),
    )
    return save_model(folder / "classifier.safetensors", clf.inference_state_dict(), metadata)


def _count(module) -> float:
    return sum(p.numel() for p in module.parameters()) / 1e6


def measure(name: str, spatial_dims: int, size: int, device, config: dict, inversion_steps: int, warmup: bool, folder: Path) -> dict:
    shape = [size] * spatial_dims
    config = dict(config)
    if name == "medxgan":
        config.setdefault("classifier_model", str(_classifier_file(folder, spatial_dims, shape)))
    preprocessing = PreprocessingConfig(spatial_dims=spatial_dims, size=shape, spacing=[1.0] * spatial_dims)
    config = get_method_class(name).prepare_config(config, preprocessing)
    torch.manual_seed(0)
    method = create_method(name, spatial_dims, config, training=True).to(device)
    total = _count(method.networks)
    kept = sum(_count(method.networks[n]) for n in method.inference_networks)
    optimizers = {k: opt for k, (opt, _) in method.configure_optimizers(1000).items()}
    amp = torch.bfloat16 if device.type == "cuda" else None
    ctx = TrainingContext(device, optimizers, amp, generator=torch.Generator().manual_seed(0))
    ctx.total_steps = 1000

    def batch():
        return {"normal": torch.rand(1, 1, *shape, device=device) * 2 - 1, "abnormal": torch.rand(1, 1, *shape, device=device) * 2 - 1}

    ctx.sample_batch = batch
    method.networks.train()
    steps = []
    for step in ([26, 27] if warmup else [26]):  # 26: a regular VA-GAN step (5 critic updates)
        ctx.step = step
        start = _clock(device)
        method.training_step(batch(), ctx)
        steps.append(_clock(device) - start)
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
    method.networks.eval()
    options = {"inversion_steps": inversion_steps} if name == "medxgan" else {}
    x = torch.rand(1, 1, *shape, device=device) * 2 - 1
    runs = []
    for _ in range(2 if warmup else 1):
        start = _clock(device)
        with torch.autocast(device.type, torch.bfloat16) if amp else torch.autocast("cpu", enabled=False):
            method.attribute(x, **options)
        runs.append(_clock(device) - start)
    return {
        "method": name,
        "params_m": round(total, 2),
        "kept_params_m": round(kept, 2),
        "train_step_s": round(steps[-1], 3),
        "inference_s": round(runs[-1], 3),
        "peak_gib": round(peak, 2) if peak is not None else None,
        "note": f"medXGAN inference with {inversion_steps} inversion steps" if name == "medxgan" else "",
    }


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--methods", nargs="+", default=available_methods())
    parser.add_argument("--spatial-dims", type=int, default=3, choices=[2, 3])
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--threads", type=int, default=1, help="CPU threads (default 1: CPU seconds are then comparable)")
    parser.add_argument("--config", action="append", default=[], metavar="METHOD:KEY=VALUE")
    parser.add_argument("--medxgan-inversion-steps", type=int, default=500)
    parser.add_argument("--no-warmup", action="store_true")
    parser.add_argument("--json", default=None, help="also write the rows as JSON")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    configs: dict[str, dict] = {}
    for item in args.config:
        method, pair = item.split(":", 1)
        key, value = pair.split("=", 1)
        try:
            configs.setdefault(method, {})[key] = json.loads(value)
        except json.JSONDecodeError:
            configs.setdefault(method, {})[key] = value
    rows = []
    with tempfile.TemporaryDirectory() as folder:
        for name in args.methods:
            rows.append(measure(name, args.spatial_dims, args.size, device, configs.get(name, {}), args.medxgan_inversion_steps, not args.no_warmup, Path(folder)))
            print(f"measured {json.dumps(rows[-1])}", file=sys.stderr, flush=True)  # kept if a later method fails
    clock = "wall s (CUDA, bf16 autocast)" if device.type == "cuda" else f"CPU s ({args.threads} thread)"
    grid = "x".join([str(args.size)] * args.spatial_dims)
    print(f"\n{grid}, batch 1 normal + 1 abnormal, {clock}, torch {torch.__version__}")
    print(f"| method | parameters (M) | kept in model file (M) | training step | inference | peak GPU GiB |\n|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['method']} | {r['params_m']} | {r['kept_params_m']} | {r['train_step_s']} | {r['inference_s']} | {r['peak_gib'] if r['peak_gib'] is not None else '-'} |")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
