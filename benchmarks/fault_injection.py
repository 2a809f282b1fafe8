"""Fault injection: SIGKILL a training run at random moments (>= 20 times), resume it each time with the
same command plus --resume, and check that it ends with exactly the weights and the log (every step once,
same values) of an uninterrupted run. The test suite runs a short version
(Testing/test_run_folder.py::test_resume_after_sigkill_gives_the_uninterrupted_weights_and_log).

    nice -n 10 env OMP_NUM_THREADS=1 python benchmarks/fault_injection.py --kills 20 --out fault_injection.json

Kill moments are uniform over [0, --max-delay] seconds after each start, so they land in start-up, data
caching, training steps, validation, checkpoint and model writes alike.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

TIMING_COLUMNS = ("seconds", "step_seconds", "elapsed_seconds")


def log_rows(folder: Path) -> list[dict]:
    with open(folder / "log.csv", newline="") as f:
        return [{k: v for k, v in row.items() if k not in TIMING_COLUMNS} for row in csv.DictReader(f)]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kills", type=int, default=20)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--max-delay", type=float, default=None, help="seconds (default: 1.3 x the uninterrupted run's time)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--work", default=None, help="working folder (default: a new temporary one)")
    parser.add_argument("--out", default=None, help="write the result as JSON")
    args = parser.parse_args()

    from safetensors.torch import load_file

    from CounterfactualVAResearch.data.synthetic import generate_synthetic

    work = Path(args.work or tempfile.mkdtemp(prefix="cfva-faults-"))
    cohort = generate_synthetic(work / "cohort", n=40, size=32, spatial_dims=2, seed=0)

    def command(out: Path, resume: bool) -> list[str]:
        return [
            sys.executable, "-m", "CounterfactualVACLI", "train", "--method", "vantgan", "--data", str(cohort), "--out", str(out),
            "--steps", str(args.steps), "--checkpoint-every", "5", "--val-every", "10", "--log-every", "1", "--spatial-dims", "2",
            "--size", "32", "32", "--spacing", "1", "1", "--crop", "image", "--intensity", "minmax", "--device", "cpu",
            "--config", "ngf=4", "--config", "n_blocks=1", "--config", "ndf=4",
        ] + (["--resume"] if resume else [])

    env = dict(os.environ, OMP_NUM_THREADS="1")
    reference = work / "reference"
    started = time.perf_counter()
    subprocess.run(command(reference, False), env=env, check=True, capture_output=True)
    reference_seconds = time.perf_counter() - started
    max_delay = args.max_delay or 1.3 * reference_seconds
    rng = random.Random(args.seed)

    run = work / "killed"
    kills, starts, exit_codes = [], 0, []
    while True:
        resume = (run / "checkpoint.pt").exists()
        process = subprocess.Popen(command(run, resume), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        starts += 1
        if len(kills) < args.kills:
            delay = rng.uniform(0, max_delay)
            try:
                process.wait(timeout=delay)
            except subprocess.TimeoutExpired:
                process.send_signal(signal.SIGKILL)
                kills.append(round(delay, 2))
        stderr = process.communicate()[1]
        exit_codes.append(process.returncode)
        if process.returncode == 0 and len(kills) >= args.kills:
            break
        if process.returncode == 0:  # finished before enough kills: start the killed run again from scratch
            shutil.rmtree(run)
            continue
        if process.returncode != -signal.SIGKILL:
            print(f"run ended with {process.returncode}:\n{stderr}", file=sys.stderr)
            return 1

    got, expected = load_file(str(run / "model.safetensors")), load_file(str(reference / "model.safetensors"))
    same_weights = set(got) == set(expected) and all(bool((got[k] == expected[k]).all()) for k in expected)
    steps = [int(row["step"]) for row in log_rows(run)]
    result = {
        "kills": len(kills),
        "starts": starts,
        "kill_moments_s": kills,
        "reference_seconds": round(reference_seconds, 1),
        "same_weights_as_uninterrupted": same_weights,
        "log_steps_once_each": steps == sorted(set(steps)),
        "log_equals_uninterrupted": log_rows(run) == log_rows(reference),
        "leftover_temporaries": sorted(p.name for p in run.iterdir() if p.name.startswith((".tmp-", ".run.lock"))),
    }
    text = json.dumps(result, indent=2)
    print(text)
    if args.out:
        Path(args.out).write_text(text)
    ok = same_weights and result["log_steps_once_each"] and result["log_equals_uninterrupted"] and not result["leftover_temporaries"]
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
