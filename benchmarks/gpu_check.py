"""The GPU check, as one table: what a task lent a GPU measures in one call (run by benchmarks/gpu_check.sh).

1. Generator forward at 128^3 (CycleGAN ResNet-9, ngf 32, batch 1): fp32 against bf16 + channels_last_3d,
   CUDA events, median of 10 after warm-up, next to the anchors of ../shared/gpu-anchors.md (H100: 51 / 27 ms),
   with the bf16 output's relative error against fp32.
2. One training step of every registered method at 128^3 (bf16 autocast as the training loop), one normal +
   one abnormal random volume: steps/s and peak GPU memory (benchmarks/method_table.py's measurement).
3. ICAM's 20-sample maps at 128^3 (the Slicer option ``samples=20``).
4. The 1 mm end-to-end attribution (the MNI152 T1 when nilearn or a carried copy is there, else the shipped
   sample resampled to 1 mm): ``attribute`` in a fresh process (what a user waits for), then the same request
   twice to one warm worker.

``--tiny`` runs all of it on the CPU at toy sizes (16^3, narrow networks, one request), so the test suite keeps
it working on machines without a GPU; the figures are then meaningless.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO / "CounterfactualVA"), str(REPO / "CounterfactualVATraining"), str(REPO), str(REPO / "benchmarks")]

import torch  # noqa: E402

SAMPLE_MODEL = REPO / "samples" / "vantgan_phantom3d.safetensors"
SAMPLE_SCAN = REPO / "samples" / "phantom_atrophy.nii.gz"
#: ../shared/gpu-anchors.md (H100 80GB, torch 2.11): generator forward at 128^3, ngf 32
ANCHOR_MS = {"fp32": 51.0, "bf16+cl3d": 27.0}


def timed(fn, device, repeats: int) -> float:
    """Median seconds of `fn()` after one warm-up call (CUDA events on a GPU)."""
    fn()
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end) / 1000)
        else:
            start = time.perf_counter()
            fn()
            times.append(time.perf_counter() - start)
    return statistics.median(times)


def generator_forward(device, size: int, ngf: int, blocks: int, repeats: int) -> list[list]:
    from CounterfactualVALib.networks import ResNetGenerator

    torch.manual_seed(0)
    net = ResNetGenerator(3, ngf=ngf, n_blocks=blocks, output_activation="tanh2").to(device).eval()
    x = torch.randn(1, 1, size, size, size, device=device)
    rows, reference = [], None
    modes = [("fp32", None, torch.contiguous_format)] + ([("bf16+cl3d", torch.bfloat16, torch.channels_last_3d)] if device.type == "cuda" else [])
    for mode, dtype, memory_format in modes:
        net = net.to(memory_format=memory_format)
        xi = x.contiguous(memory_format=memory_format)
        with torch.no_grad(), torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
            seconds = timed(lambda: net(xi), device, repeats)
            out = net(xi).float()
        if reference is None:
            reference, error = out, 0.0
        else:
            error = float((out - reference).norm() / reference.norm())
        anchor = f"{ANCHOR_MS[mode]:.0f} ms (H100)" if device.type == "cuda" else "-"
        rows.append([f"generator forward {size}^3 ngf {ngf} x{blocks} blocks, {mode}", f"{seconds * 1000:.1f} ms", anchor, f"rel. error vs fp32 {error:.1e}"])
    return rows


def training_steps(device, size: int, tiny: bool) -> list[list]:
    from method_table import measure

    from CounterfactualVALib.methods import available_methods

    # --tiny: the narrowest sensible networks (the figures only prove that every step runs)
    tiny_configs = {
        "vantgan": {"ngf": 4, "n_blocks": 1, "ndf": 4, "n_layers_d": 1}, "antgan": {"ngf": 4, "n_blocks": 1, "ndf": 4, "n_layers_d": 1},
        "agcyclegan": {"ngf": 4, "n_blocks": 1, "ndf": 4, "n_layers_d": 1},
    }
    rows = []
    with tempfile.TemporaryDirectory() as folder:
        for name in available_methods():
            if device.type == "cuda":
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats(device)
            try:
                r = measure(name, 3, size, device, tiny_configs.get(name, {}) if tiny else {}, inversion_steps=20 if tiny else 500, warmup=not tiny, folder=Path(folder))
            except Exception as exc:  # noqa: BLE001 - one failing method must not hide the others' figures
                rows.append([f"training step {name} {size}^3", "FAILED", "", f"{type(exc).__name__}: {str(exc)[:120]}"])
                continue
            peak = f"peak {r['peak_gib']:.1f} GiB" if r["peak_gib"] is not None else "peak -"
            rows.append([f"training step {name} {size}^3", f"{1 / r['train_step_s']:.2f} steps/s", peak, f"inference {r['inference_s']:.3f} s"])
    return rows


def icam_samples(device, size: int, samples: int, tiny: bool) -> list[list]:
    from CounterfactualVALib.methods import create_method

    torch.manual_seed(0)
    config = {"grid_size": [size] * 3}
    method = create_method("icam", 3, config, training=False).to(device).eval()
    x = torch.rand(1, 1, size, size, size, device=device) * 2 - 1
    autocast = torch.autocast(device.type, torch.bfloat16) if device.type == "cuda" else torch.autocast("cpu", enabled=False)
    with autocast:
        seconds = timed(lambda: method.attribute(x, samples=samples), device, 1 if tiny else 3)
    return [[f"ICAM {samples}-sample maps {size}^3", f"{seconds:.3f} s", "", "mean and std over latent samples"]]


def mni_or_sample_1mm(folder: Path) -> tuple[Path, str]:
    """The 1 mm MNI152 T1 (a carried copy in benchmarks/data/, or nilearn's), else the sample at 1 mm."""
    import importlib.util

    import SimpleITK as sitk

    name = "mni_icbm152_t1_tal_nlin_sym_09a_converted.nii.gz"
    carried = REPO / "benchmarks" / "data" / name
    if carried.is_file():
        return carried, "MNI152 T1 1 mm (carried)"
    spec = importlib.util.find_spec("nilearn")
    if spec is not None and (Path(spec.origin).parent / "datasets" / "data" / name).is_file():
        return Path(spec.origin).parent / "datasets" / "data" / name, "MNI152 T1 1 mm (nilearn)"
    image = sitk.ReadImage(str(SAMPLE_SCAN))
    size = [int(round(s * sp)) for s, sp in zip(image.GetSize(), image.GetSpacing())]
    reference = sitk.Image(size, sitk.sitkFloat32)
    reference.SetSpacing((1.0, 1.0, 1.0))
    reference.SetOrigin(image.GetOrigin())
    reference.SetDirection(image.GetDirection())
    path = folder / "sample_1mm.nii.gz"
    sitk.WriteImage(sitk.Resample(image, reference, sitk.Transform(), sitk.sitkLinear), str(path))
    return path, "shipped sample resampled to 1 mm"


def end_to_end(device, tiny: bool) -> list[list]:
    from CounterfactualVALib.worker import WorkerClient

    rows = []
    with tempfile.TemporaryDirectory() as folder:
        folder = Path(folder)
        if tiny:
            scan, what = SAMPLE_SCAN, "shipped sample (tiny mode)"
        else:
            scan, what = mni_or_sample_1mm(folder)
        env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO / "CounterfactualVA"), os.environ.get("PYTHONPATH", "")]))
        command = [sys.executable, "-m", "CounterfactualVACLI", "attribute", "--model", str(SAMPLE_MODEL), "--input", str(scan), "--device", device.type]
        start = time.perf_counter()
        subprocess.run(command + ["--out", str(folder / "fresh")], env=env, check=True, capture_output=True)
        wall = time.perf_counter() - start
        timings = json.loads((folder / "fresh" / "summary.json").read_text())["timings_s"]
        stages = ", ".join(f"{k} {v:.2f}" for k, v in timings.items() if k != "total")
        rows.append([f"1 mm attribution, fresh process ({what})", f"{wall:.2f} s", f"in-process {timings['total']:.2f} s", stages])
        with WorkerClient(env=env) as client:
            walls = []
            for i in range(1 if tiny else 2):
                start = time.perf_counter()
                client.attribute(SAMPLE_MODEL, scan, folder / f"warm{i}", device=device.type)
                walls.append(time.perf_counter() - start)
        rows.append([f"1 mm attribution, warm worker ({what})", f"{walls[-1]:.2f} s", f"first request {walls[0]:.2f} s", "model loaded once, torch imported once"])
    return rows


def print_table(rows: list[list], title: str) -> str:
    header = ["check", "figure", "next to", "note"]
    widths = [max(len(str(x)) for x in col) for col in zip(header, *rows)]
    lines = [title, "| " + " | ".join(h.ljust(w) for h, w in zip(header, widths)) + " |", "|" + "|".join("-" * (w + 2) for w in widths) + "|"]
    lines += ["| " + " | ".join(str(x).ljust(w) for x, w in zip(row, widths)) + " |" for row in rows]
    text = "\n".join(lines)
    print(text, flush=True)
    return text


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="CPU, toy sizes: proves the script runs, measures nothing")
    parser.add_argument("--out", type=Path, default=None, help="also write the table here (markdown)")
    args = parser.parse_args(argv)
    cuda = torch.cuda.is_available() and not args.tiny
    if not cuda and not args.tiny:
        print("No CUDA GPU here: run with --tiny for the CPU smoke run.", file=sys.stderr)
        return 2
    device = torch.device("cuda" if cuda else "cpu")
    size = 16 if args.tiny else 128
    rows = []
    steps = [
        ("generator forward", lambda: generator_forward(device, size, 4 if args.tiny else 32, 1 if args.tiny else 9, 1 if args.tiny else 10)),
        ("training steps", lambda: training_steps(device, size, args.tiny)),
        ("ICAM samples", lambda: icam_samples(device, size, 2 if args.tiny else 20, args.tiny)),
        ("end to end", lambda: end_to_end(device, args.tiny)),
    ]
    for name, step in steps:
        start = time.perf_counter()
        try:
            rows += step()
        except Exception as exc:  # noqa: BLE001 - the table shows what failed next to what worked
            rows.append([name, "FAILED", "", f"{type(exc).__name__}: {str(exc)[:160]}"])
        print(f"[gpu_check] {name}: {time.perf_counter() - start:.1f} s", file=sys.stderr, flush=True)
    gpu = f"{torch.cuda.get_device_name(0)}" if cuda else "CPU (--tiny: toy sizes, figures meaningless)"
    text = print_table(rows, f"\nGPU check on {gpu}, torch {torch.__version__}")
    if args.out:
        args.out.write_text(text + "\n")
    return 1 if any(row[1] == "FAILED" for row in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
