"""Attribution speed against the floor, per stage, in one run (speed targets live here, not in tests).

For the 1 mm MNI152 T1 (the copy in nilearn's wheel, 197x233x189) and the shipped sample scan, with the
shipped model, this prints:

1. **What a user waits for per command**: `counterfactualva attribute ...` in a fresh process, wall time from
   launch to exit and the peak resident memory of that process, split into the stages the command reports
   (in-process: read, validate, preprocess, model load, attribute, postprocess, each output written, figure)
   and "process start, imports and exit" (the wall time the command's own stages do not cover).
2. **The floor** measured in the same run, alternating with the runs above: SimpleITK reading the input and
   writing the very volumes the run wrote (read back from its output folder, same content, same file names
   and format, SimpleITK's default settings), in this process.
3. **Warm worker**: the same request sent twice to one worker process (`counterfactualva worker`, the one the
   Slicer module keeps alive between Apply clicks): wall time per request as the client sees it.
4. **Slicer path** (with slicer-core): the module's logic with its warm worker, Apply to nodes shown, minus
   the worker's own time for the request (writing the input node to a file, loading the outputs into nodes).

    nice -n 10 python benchmarks/attribution_benchmark.py [--repeats 3] [--inputs mni152 sample]
        [--package-root DIR]   # measure another checkout's CounterfactualVA/ (e.g. the code before a change)
        [--forward] [--subjects N]   # generator forward table; the sample model's held-out accuracy

Ratios are taken between medians measured in this run, so a machine that other jobs load slows both sides.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
SAMPLE_MODEL = REPO / "samples" / "vantgan_phantom3d.safetensors"
SAMPLE_SCAN = REPO / "samples" / "phantom_atrophy.nii.gz"
#: targets of issue 14 (2 cores): in-process read..last file vs floor, end to end vs floor, end to end, memory
TARGETS = {"in_process_ratio": 1.5, "end_to_end_ratio": 2.2, "end_to_end_s": 6.0, "peak_mb": 1536, "warm_s": 3.0}


def mni152_t1() -> Path:
    spec = importlib.util.find_spec("nilearn")
    if spec is None or spec.origin is None:
        raise SystemExit("nilearn is not installed: `pip install nilearn` (its wheel carries the MNI152 T1 template).")
    path = Path(spec.origin).parent / "datasets" / "data" / "mni_icbm152_t1_tal_nlin_sym_09a_converted.nii.gz"
    if not path.is_file():
        raise SystemExit(f"{path} is missing from this nilearn installation.")
    return path


def table(title: str, header: list[str], rows: list[list]) -> None:
    print(f"\n{title}")
    widths = [max(len(str(x)) for x in col) for col in zip(header, *rows)]
    print(" | ".join(str(h).ljust(w) for h, w in zip(header, widths)))
    print("-+-".join("-" * w for w in widths))
    for row in rows:
        print(" | ".join(str(x).ljust(w) for x, w in zip(row, widths)))
    sys.stdout.flush()


def child_environment(package_root: Path | None) -> dict:
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", str(os.cpu_count() or 1))
    if package_root is not None:
        env["PYTHONPATH"] = os.pathsep.join([str(package_root), str(package_root.parent), env.get("PYTHONPATH", "")])
    return env


def cli_module(package_root: Path | None) -> str:
    """The command-line module of the checkout being measured (it moved between versions)."""
    root = package_root or REPO / "CounterfactualVA"
    return "CounterfactualVACLI" if (root / "CounterfactualVACLI").is_dir() else "CounterfactualVALib.cli"


def run_command(command: list[str], env: dict) -> tuple[float, float, str]:
    """(wall seconds from launch to exit, peak RSS of that process in MB, stderr); raises on failure."""
    start = time.perf_counter()
    proc = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    stderr = proc.stderr.read()
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - start
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed ({proc.returncode}):\n{stderr[-2000:]}")
    return wall, usage.ru_maxrss / 1024.0, stderr


def written_volumes(out_dir: Path) -> list[Path]:
    summary = json.loads((out_dir / "summary.json").read_text())
    outputs = summary["outputs"]
    names = [outputs.get("counterfactual"), outputs["attribution"], outputs["mask"], *(outputs.get("extras") or {}).values()]
    names += list((outputs.get("series") or {}).values())
    return [out_dir / name for name in names if name]


def floor_seconds(input_path: Path, volumes: list[Path], scratch: Path) -> dict:
    """SimpleITK reading the input and writing `volumes` (their own content, names and format), default settings."""
    import SimpleITK as sitk

    images = [(sitk.ReadImage(str(path)), scratch / path.name) for path in volumes]
    scratch.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    sitk.ReadImage(str(input_path))
    read = time.perf_counter() - start
    writes = []
    for image, target in images:
        start = time.perf_counter()
        sitk.WriteImage(image, str(target))
        writes.append(time.perf_counter() - start)
    shutil.rmtree(scratch, ignore_errors=True)
    return {"read": read, "write": sum(writes), "total": read + sum(writes)}


def command_runs(name: str, input_path: Path, repeats: int, env: dict, module: str, tmp: Path) -> dict:
    command = [sys.executable, "-m", module, "attribute", "--model", str(SAMPLE_MODEL), "--input", str(input_path)]
    run_command(command + ["--out", str(tmp / f"{name}-warmup")], env)  # page cache, .pyc files
    runs, floors, starts = [], [], []
    for i in range(repeats):
        out = tmp / f"{name}-{i}"
        wall, peak, _ = run_command(command + ["--out", str(out)], env)
        timings = json.loads((out / "summary.json").read_text())["timings_s"]
        runs.append({"wall": wall, "peak_mb": peak, "timings": timings})
        floors.append(floor_seconds(input_path, written_volumes(out), tmp / f"{name}-floor-{i}"))
        starts.append(process_start_seconds(env))
    return {"runs": runs, "floors": floors, "starts": starts, "out": tmp / f"{name}-0"}


def process_start_seconds(env: dict) -> dict:
    """What any fresh command pays before its work: Python starting with SimpleITK imported (the floor's own
    command), and with torch imported too (any PyTorch command), launch to exit."""
    simpleitk, _, _ = run_command([sys.executable, "-c", "import SimpleITK"], env)
    with_torch, _, _ = run_command([sys.executable, "-c", "import SimpleITK, torch"], env)
    return {"simpleitk": simpleitk, "torch": with_torch - simpleitk}


def report_command(name: str, input_path: Path, result: dict) -> dict:
    import SimpleITK as sitk

    runs, floors = result["runs"], result["floors"]
    median = statistics.median
    stages = list(runs[0]["timings"])
    in_process = [r["timings"]["total"] for r in runs]
    # the target's span: from reading the input to the last file written (the model load is its own stage)
    read_to_written = [r["timings"]["total"] - r["timings"].get("load_model", 0.0) for r in runs]
    outside = [r["wall"] - r["timings"]["total"] for r in runs]
    floor = median(f["total"] for f in floors)
    rows = [["process start, imports and exit (wall minus the stages below)", f"{median(outside):.3f}", ""]]
    for stage in stages:
        if stage != "total":
            rows.append([stage, f"{median(r['timings'][stage] for r in runs):.3f}", ""])
    rows.append(["in-process, read .. last file written (model load excluded)", f"{median(read_to_written):.3f}", f"{median(read_to_written) / floor:.2f}x floor"])
    rows.append(["in-process total (model load included)", f"{median(in_process):.3f}", f"{median(in_process) / floor:.2f}x floor"])
    rows.append(["what the user waits for (launch to exit)", f"{median(r['wall'] for r in runs):.3f}", f"{median(r['wall'] for r in runs) / floor:.2f}x floor"])
    rows.append(["floor: SimpleITK read input", f"{median(f['read'] for f in floors):.3f}", ""])
    rows.append(["floor: SimpleITK write the run's volumes", f"{median(f['write'] for f in floors):.3f}", ""])
    rows.append(["floor total", f"{floor:.3f}", ""])
    starts = result["starts"]
    start_floor = median(st["simpleitk"] for st in starts)
    command_floor = floor + start_floor
    wall = median(r["wall"] for r in runs)
    rows.append(["fresh Python importing SimpleITK, launch to exit", f"{start_floor:.3f}", ""])
    rows.append(["floor as a command (that + floor total)", f"{command_floor:.3f}", ""])
    rows.append(["what the user waits for, against the floor as a command", f"{wall:.3f}", f"{wall / command_floor:.2f}x"])
    rows.append(["importing torch in a fresh process (any PyTorch command pays it)", f"{median(st['torch'] for st in starts):.3f}", ""])
    rows.append(["peak memory of the command (MB)", f"{max(r['peak_mb'] for r in runs):.0f}", ""])
    size = "x".join(map(str, sitk.ReadImage(str(input_path)).GetSize()))
    table(f"{name} ({size}, {input_path.name}): `attribute` in a fresh process, median of {len(runs)} (seconds)", ["stage", "s", "ratio"], rows)
    return {
        "in_process_s": median(read_to_written), "in_process_with_load_s": median(in_process), "wall_s": median(r["wall"] for r in runs), "floor_s": floor,
        "in_process_ratio": median(read_to_written) / floor, "end_to_end_ratio": median(r["wall"] for r in runs) / floor,
        "command_floor_s": command_floor, "end_to_end_ratio_to_command_floor": wall / command_floor,
        "torch_import_s": median(st["torch"] for st in starts),
        "peak_mb": max(r["peak_mb"] for r in runs), "stages": {s: median(r["timings"][s] for r in runs) for s in stages},
    }


def warm_worker(name: str, input_path: Path, env: dict, tmp: Path, package_root: Path | None = None) -> dict | None:
    """Two identical requests to one worker: the first pays imports and the model load, the second only the
    in-process stages. None when the checkout has no worker."""
    if not (package_root or REPO / "CounterfactualVA").joinpath("CounterfactualVALib", "worker.py").is_file():
        return None
    sys.path[:0] = [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]
    from CounterfactualVALib.worker import WorkerClient

    client = WorkerClient(env=env)
    try:
        walls, timings = [], []
        for i in range(3):
            start = time.perf_counter()
            summary = client.attribute(model=str(SAMPLE_MODEL), input=str(input_path), out=str(tmp / f"{name}-warm-{i}"))
            walls.append(time.perf_counter() - start)
            timings.append(summary.timings_s)
    finally:
        client.close()
    rows = [[f"request {i + 1}", f"{w:.3f}", f"{t['total']:.3f}"] for i, (w, t) in enumerate(zip(walls, timings))]
    table(f"{name}: one warm worker, three identical requests (seconds)", ["request", "client wall", "in-process"], rows)
    return {"first_s": walls[0], "warm_s": statistics.median(walls[1:])}


def slicer_path(name: str, input_path: Path, env: dict) -> dict | None:
    """Apply to nodes shown, minus the worker's own time for the request: what the Slicer module adds (writing
    the input node for the worker, reading its outputs into new displayed nodes), with the logic on
    slicer-core and its warm worker, second Apply on the same model."""
    try:
        import slicer  # noqa: F401
    except ImportError:
        return None
    sys.path[:0] = [str(REPO / "CounterfactualVA")]
    import CounterfactualVA as module
    from CounterfactualVALib import slicer_nodes

    scene = module.makeScene()
    node = slicer_nodes.read_volume(input_path)
    node.SetName(name)
    scene.AddNode(node)
    node.CreateDefaultDisplayNodes()
    logic = module.CounterfactualVALogic()
    logic.useWorker = True
    try:
        rows, overheads = [], []
        for i in range(3):
            start = time.perf_counter()
            process = logic.run(node, str(SAMPLE_MODEL), device="cpu", waitForCompletion=False)
            result = process.wait(timeout=900)
            wall = time.perf_counter() - start
            rows.append([f"Apply {i + 1}", f"{wall:.3f}", f"{process.workerSeconds:.3f}", f"{wall - process.workerSeconds:.3f}"])
            if i:
                overheads.append(wall - process.workerSeconds)
            slicer_nodes.remove_nodes(result.nodes())
    finally:
        logic.releaseWorker()
    table(
        f"{name}: Slicer path on slicer-core, warm worker (Apply to nodes shown; the worker's own time; the difference is what Slicer adds: input node to file, outputs to displayed nodes)",
        ["Apply", "to nodes shown", "worker", "Slicer adds"], rows,
    )
    return {"slicer_overhead_s": statistics.median(overheads), "slicer_apply_s": float(rows[-1][1])}


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
            with torch.no_grad():
                net(x)
                times = []
                for _ in range(2):
                    start = time.perf_counter()
                    net(x)
                    times.append(time.perf_counter() - start)
            rows.append(["x".join(map(str, size)), ngf, blocks, f"{statistics.median(times) * 1000:.0f}"])
    table(f"ResNet generator forward, batch 1, fp32 ({device}; GPU figures: benchmarks/gpu_check.sh)", ["grid", "ngf", "blocks", "ms"], rows)


def sample_accuracy(subjects: int) -> None:
    import SimpleITK as sitk

    from CounterfactualVALib.checkpoint import read_metadata, save_model
    from CounterfactualVALib.inference import run_attribution
    from CounterfactualVALib.methods import create_method
    from CounterfactualVALib.metrics import dice, iou, ncc

    from CounterfactualVAResearch.data.phantom import generate_phantom_cohort
    from CounterfactualVALib.cohort import read_cohort_csv

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
                amap = sitk.GetArrayFromImage(sitk.ReadImage(str(out / summary.outputs.attribution)))
                mask = sitk.GetArrayFromImage(sitk.ReadImage(str(out / summary.outputs.mask)))
                scores[name].append((ncc(np.abs(amap), np.abs(truth), brain), dice(mask, truth_mask), iou(mask, truth_mask)))
            scores["constant map"].append((ncc(np.ones_like(truth), np.abs(truth), brain), dice(brain, truth_mask), iou(brain, truth_mask)))
    rows = [[name, f"{np.mean([s[0] for s in v]):.3f}", f"{np.mean([s[1] for s in v]):.3f}", f"{np.mean([s[2] for s in v]):.3f}"] for name, v in scores.items()]
    table(f"held-out phantom subjects (n={len(abnormal)} abnormal, seed 1234, 4 mm)", ["map", "NCC |map| vs |truth| (brain)", "Dice (paper rule)", "IoU"], rows)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--inputs", nargs="+", default=["mni152", "sample"], choices=["mni152", "sample"])
    parser.add_argument("--package-root", type=Path, default=None, help="a checkout's CounterfactualVA/ folder to measure instead of this one")
    parser.add_argument("--forward", action="store_true", help="also print the generator forward table")
    parser.add_argument("--subjects", type=int, default=0, help="also score the sample model on N held-out phantom subjects")
    parser.add_argument("--json", type=Path, default=None, help="write the figures as JSON")
    args = parser.parse_args()

    env = child_environment(args.package_root.resolve() if args.package_root else None)
    module = cli_module(args.package_root.resolve() if args.package_root else None)
    print(f"CPU cores {os.cpu_count()}, OMP_NUM_THREADS={env['OMP_NUM_THREADS']}, load average {os.getloadavg()[0]:.2f}; command module {module}")
    inputs = {"mni152": mni152_t1(), "sample": SAMPLE_SCAN}
    figures = {}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        for name in args.inputs:
            result = command_runs(name, inputs[name], args.repeats, env, module, tmp)
            figures[name] = report_command(name, inputs[name], result)
            warm = warm_worker(name, inputs[name], env, tmp, args.package_root.resolve() if args.package_root else None)
            if warm:
                figures[name].update(warm)
            if args.package_root is None:
                slicer_figures = slicer_path(name, inputs[name], env)
                if slicer_figures:
                    figures[name].update(slicer_figures)
    rows = []
    for name, f in figures.items():
        rows.append([
            name, f"{f['in_process_s']:.2f} ({f['in_process_ratio']:.2f}x)", f"{f['wall_s']:.2f} ({f['end_to_end_ratio']:.2f}x)",
            f"{f['end_to_end_ratio_to_command_floor']:.2f}x", f"{f['torch_import_s']:.2f}", f"{f['floor_s']:.2f}", f"{f['peak_mb']:.0f}", f"{f['warm_s']:.2f}" if "warm_s" in f else "-",
            f"{f['slicer_overhead_s']:.2f}" if "slicer_overhead_s" in f else "-",
        ])
    table(
        f"Summary (seconds; targets: in-process <= {TARGETS['in_process_ratio']}x floor, per command <= {TARGETS['end_to_end_ratio']}x floor and "
        f"< {TARGETS['end_to_end_s']:.0f} s, peak < {TARGETS['peak_mb']} MB, warm request < {TARGETS['warm_s']:.0f} s)",
        ["input", "in-process read..last file (x floor)", "per command, user waits (x floor)", "per command vs floor as a command",
         "torch import", "floor", "peak MB", "warm request", "Slicer adds"], rows,
    )
    if args.json:
        args.json.write_text(json.dumps(figures, indent=2, default=str))
    if args.forward:
        generator_forward([(40, 48, 40), (64, 64, 64)], [(8, 3), (16, 6)])
    if args.subjects:
        sample_accuracy(args.subjects)
    return 0


if __name__ == "__main__":
    sys.exit(main())
