"""Attribution speed and the sample model's accuracy, printed as tables (speed targets live here, not in tests).

1. `counterfactualva attribute` on the shipped sample scan: wall time per stage (median of --repeats runs,
   in-process, after one warm-up).
2. VANT-GAN generator forward time at several grids and widths on the device at hand (CUDA if present:
   fp32 and bf16 + channels_last_3d, timed with CUDA events; CPU otherwise).
3. The sample model on held-out phantom subjects (a fresh seed, never seen in training): NCC of |map| with
   |ground-truth difference| (in the brain) and Dice/IoU of the paper-rule mask against the atrophy region,
   next to an untrained generator of the same architecture and a constant map.

    python benchmarks/attribution_benchmark.py [--repeats 3] [--subjects 6]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
SAMPLE_MODEL = REPO / "samples" / "vantgan_phantom3d.safetensors"
SAMPLE_SCAN = REPO / "samples" / "phantom_atrophy.nii.gz"


def table(title: str, header: list[str], rows: list[list]) -> None:
    print(f"\n{title}")
    widths = [max(len(str(x)) for x in col) for col in zip(header, *rows)]
    print(" | ".join(str(h).ljust(w) for h, w in zip(header, widths)))
    print("-+-".join("-" * w for w in widths))
    for row in rows:
        print(" | ".join(str(x).ljust(w) for x, w in zip(row, widths)))


def stage_times(repeats: int) -> None:
    from CounterfactualVALib.inference import run_attribution

    with tempfile.TemporaryDirectory() as tmp:
        run_attribution(SAMPLE_MODEL, SAMPLE_SCAN, tmp)  # warm-up: imports, allocator
        runs = [run_attribution(SAMPLE_MODEL, SAMPLE_SCAN, Path(tmp) / str(i))["timings_s"] for i in range(repeats)]
        device = run_attribution(SAMPLE_MODEL, SAMPLE_SCAN, Path(tmp) / "d")["device"]
    rows = [[stage, f"{statistics.median(r[stage] for r in runs):.3f}"] for stage in runs[0]]
    table(f"attribute on the sample scan ({device}; median of {repeats}, after warm-up)", ["stage", "seconds"], rows)


def generator_forward(sizes, widths) -> None:
    import torch

    from CounterfactualVALib.networks import ResNetGenerator

    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    rows = []
    for size in sizes:
        for ngf, blocks in widths:
            net = ResNetGenerator(3, ngf=ngf, n_blocks=blocks, output_activation="tanh2").to(device).eval()
            x = torch.randn(1, 1, *size, device=device)
            modes = [("fp32", None, torch.contiguous_format)]
            if cuda:
                modes.append(("bf16+cl3d", torch.bfloat16, torch.channels_last_3d))
            for name, dtype, fmt in modes:
                net = net.to(memory_format=fmt)
                xi = x.contiguous(memory_format=fmt)
                with torch.no_grad(), torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
                    net(xi)
                    times = []
                    for _ in range(5 if cuda else 2):
                        if cuda:
                            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                            start.record()
                            net(xi)
                            end.record()
                            torch.cuda.synchronize()
                            times.append(start.elapsed_time(end) / 1000)
                        else:
                            t = time.perf_counter()
                            net(xi)
                            times.append(time.perf_counter() - t)
                rows.append(["x".join(map(str, size)), ngf, blocks, name, f"{statistics.median(times) * 1000:.0f}"])
    table(f"ResNet generator forward, batch 1 ({device})", ["grid", "ngf", "blocks", "mode", "ms"], rows)


def sample_accuracy(subjects: int) -> None:
    import SimpleITK as sitk

    from CounterfactualVALib.checkpoint import read_metadata, save_model
    from CounterfactualVATrainingLib.cohort import read_cohort_csv
    from CounterfactualVAResearch.data.phantom import generate_phantom_cohort
    from CounterfactualVALib.inference import run_attribution
    from CounterfactualVALib.methods import create_method
    from CounterfactualVALib.metrics import dice, iou, ncc

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        csv_path = generate_phantom_cohort(tmp / "heldout", n_subjects=subjects * 2, spacing_mm=4.0, seed=1234, val_fraction=0, test_fraction=0)
        abnormal = [r for r in read_cohort_csv(csv_path) if r["label"] == 1][:subjects]
        meta = read_metadata(SAMPLE_MODEL)
        untrained = create_method(meta.method, meta.spatial_dims, meta.method_config)
        meta.training = {"steps": 0, "data_summary": "none (untrained)"}
        untrained_path = save_model(tmp / "untrained.safetensors", untrained.inference_state_dict(), meta)
        scores = {"sample model": [], "untrained": [], "constant map": []}
        for i, record in enumerate(abnormal):
            truth = sitk.GetArrayFromImage(sitk.ReadImage(record["mask"]))
            scan = sitk.GetArrayFromImage(sitk.ReadImage(record["path"]))
            brain = scan > 0.1 * np.percentile(scan, 99)
            truth_mask = np.abs(truth) > 1e-3 * np.abs(truth).max()
            for name, model in (("sample model", SAMPLE_MODEL), ("untrained", untrained_path)):
                out = tmp / f"{name}-{i}"
                summary = run_attribution(model, record["path"], out, figure=False)
                amap = sitk.GetArrayFromImage(sitk.ReadImage(str(out / summary["outputs"]["attribution"])))
                mask = sitk.GetArrayFromImage(sitk.ReadImage(str(out / summary["outputs"]["mask"])))
                scores[name].append((ncc(np.abs(amap), np.abs(truth), brain), dice(mask, truth_mask), iou(mask, truth_mask)))
            scores["constant map"].append((ncc(np.ones_like(truth), np.abs(truth), brain), dice(brain, truth_mask), iou(brain, truth_mask)))
    rows = [[name, f"{np.mean([s[0] for s in v]):.3f}", f"{np.mean([s[1] for s in v]):.3f}", f"{np.mean([s[2] for s in v]):.3f}"] for name, v in scores.items()]
    table(f"held-out phantom subjects (n={len(abnormal)} abnormal, seed 1234, 4 mm)", ["map", "NCC |map| vs |truth| (brain)", "Dice (paper rule)", "IoU"], rows)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--subjects", type=int, default=6)
    parser.add_argument("--skip-forward", action="store_true")
    args = parser.parse_args()
    stage_times(args.repeats)
    if not args.skip_forward:
        import torch

        big = torch.cuda.is_available()
        sizes = [(40, 48, 40), (64, 64, 64)] + ([(128, 128, 128), (184, 220, 184)] if big else [])
        widths = [(8, 3)] + ([(32, 9), (64, 9)] if big else [(16, 6)])
        generator_forward(sizes, widths)
    sample_accuracy(args.subjects)
    return 0


if __name__ == "__main__":
    sys.exit(main())
