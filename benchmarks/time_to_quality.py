"""Time to quality per method at 4 mm: training steps per second, CPU minutes to reach a validation NCC of
0.3 and 0.5, the final (best) validation NCC and peak memory — printed as a table.

    python benchmarks/time_to_quality.py --data cohort.csv --minutes 30                # every CPU config, 1 thread
    python benchmarks/time_to_quality.py --data cohort.csv --threads 1 2 --methods vantgan_cpu
    python benchmarks/time_to_quality.py --device cuda --data cohort.csv --minutes 10  # the GPU column
    python benchmarks/time_to_quality.py --summarize runs/a runs/b                     # tables of finished runs

Each configuration is one model of a protocol file (default ``benchmarks/protocols/phantom3d_cpu.json``,
whose models are the CPU-budget configurations), trained by ``counterfactualva train`` in its own process
with ``--time-budget``; the table is read back from the run's ``log.csv`` (``elapsed_seconds`` and
``val_ncc`` at every validation) and ``os.wait4`` of each child for its own peak memory. Without ``--data``
the protocol's own cohort recipe is generated first.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
THRESHOLDS = (0.3, 0.5)


def summarize(run: Path) -> dict:
    with open(run / "log.csv") as f:
        rows = list(csv.DictReader(f))
    validated = [r for r in rows if r.get("val_ncc")]
    steps, elapsed = int(rows[-1]["step"]), float(rows[-1]["elapsed_seconds"])
    out = {"run": run.name, "steps": steps, "minutes": elapsed / 60, "steps_per_s": steps / elapsed if elapsed else 0.0,
           "best_ncc": max((float(r["val_ncc"]) for r in validated), default=float("nan"))}
    for t in THRESHOLDS:
        reached = [float(r["elapsed_seconds"]) / 60 for r in validated if float(r["val_ncc"]) >= t]
        out[f"min_to_{t}"] = min(reached) if reached else None
    return out


def train(name: str, spec: dict, protocol: dict, data: Path, out: Path, minutes: float, threads: int, device: str,
          cache_dir: Path | None = None) -> dict:
    pre = protocol["preprocessing"]
    command = [sys.executable, "-m", "CounterfactualVACLI", "train", "--method", spec["method"], "--data", str(data), "--out", str(out),
               "--steps", str(spec["steps"]), "--time-budget", str(minutes), "--device", device,
               "--spatial-dims", str(pre["spatial_dims"]), "--size", *map(str, pre["size"]), "--spacing", *map(str, pre["spacing"]),
               "--val-every", str(spec.get("training", {}).get("val_every", protocol.get("training", {}).get("val_every", 100)))]
    if spec.get("batch_size"):
        command += ["--batch-size", str(spec["batch_size"])]
    if spec.get("seed") is not None:
        command += ["--seed", str(spec["seed"])]
    if cache_dir is not None:  # preprocessed subjects read back instead of made again for every row
        command += ["--cache-dir", str(cache_dir)]
    if spec.get("patch_size"):
        command += ["--patch-size", *map(str, spec["patch_size"])]
    for key, value in spec.get("config", {}).items():
        command += ["--config", f"{key}={json.dumps(value) if not isinstance(value, str) else value}"]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    if (out / "checkpoint.pt").exists():
        command.append("--resume")
    # wait4 gives this child's own peak (RUSAGE_CHILDREN is the largest of every child so far)
    child = subprocess.Popen(command, env=env)
    _, status, usage = os.wait4(child.pid, 0)
    child.returncode = os.waitstatus_to_exitcode(status)
    if child.returncode:
        raise subprocess.CalledProcessError(child.returncode, command)
    row = summarize(out)
    row["peak_memory_mb"] = usage.ru_maxrss / 1024
    return row


def print_table(rows: list[dict]) -> None:
    header = ["run", "threads", "steps/s", "min to NCC 0.3", "min to NCC 0.5", "best val NCC", "minutes", "peak MB"]
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for r in rows:
        cells = [r["run"], str(r.get("threads", "-")), f"{r['steps_per_s']:.2f}",
                 *(f"{r[f'min_to_{t}']:.1f}" if r[f"min_to_{t}"] is not None else "not reached" for t in THRESHOLDS),
                 f"{r['best_ncc']:.3f}", f"{r['minutes']:.1f}", f"{r['peak_memory_mb']:.0f}" if "peak_memory_mb" in r else "-"]
        print("| " + " | ".join(cells) + " |")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--protocol", default=str(REPO / "benchmarks" / "protocols" / "phantom3d_cpu.json"))
    parser.add_argument("--data", default=None, help="cohort CSV (default: generate the protocol's cohort under --work)")
    parser.add_argument("--methods", nargs="*", default=None, help="model names of the protocol (default: every generative one)")
    parser.add_argument("--minutes", type=float, default=30.0)
    parser.add_argument("--threads", type=int, nargs="+", default=[1])
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--work", default="runs/time_to_quality")
    parser.add_argument("--cache-dir", default=None, help="preprocessed-subject cache shared by every row (train --cache-dir)")
    parser.add_argument("--summarize", nargs="*", default=None, help="only print the table of these finished run folders")
    args = parser.parse_args()
    if args.summarize is not None:
        # a protocol's models/ folder also holds files (its untrained copies): a glob over it names them too
        runs = [Path(run) for run in args.summarize if (Path(run) / "log.csv").is_file()]
        if not runs:
            parser.error("none of the --summarize paths is a training run folder (a folder with a log.csv)")
        print_table([summarize(run) for run in runs])
        return 0
    protocol = json.loads(Path(args.protocol).read_text())
    work = Path(args.work)
    data = Path(args.data) if args.data else None
    if data is None:
        from CounterfactualVAResearch.protocol import generate_data

        data = generate_data(protocol["data"], work)
    names = args.methods or [n for n, s in protocol["models"].items() if s["method"] != "classifier"]
    rows = []
    for name in names:
        for threads in args.threads:
            row = train(name, protocol["models"][name], protocol, data, work / f"{name}_{args.device}_{threads}t", args.minutes, threads, args.device,
                        Path(args.cache_dir) if args.cache_dir else None)
            rows.append({**row, "threads": threads if args.device == "cpu" else args.device})
            print_table(rows[-1:])
    print_table(rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
