"""Build the shipped sample: a 3D MNI152 phantom scan with known atrophy and a VANT-GAN trained on a phantom
cohort by our own `counterfactualva train` command (recorded in the model's metadata).

CPU budget: no GPU is lent to every task, so the sample is trained at what two CPU cores afford:
4 mm phantoms, a 40x48x40 model grid (160x192x160 mm, RAS), a narrow generator (ngf 8, 3 residual blocks).

    python benchmarks/make_sample.py [--steps 800] [--subjects 60] [--work /tmp/cfva-sample]
"""

from __future__ import annotations

import argparse
import csv
import json
import shutil
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SAMPLES = REPO / "samples"
GRID = ["--spatial-dims", "3", "--size", "40", "48", "40", "--spacing", "4", "4", "4"]
NETWORK = ["--config", "ngf=8", "--config", "n_blocks=3", "--config", "ndf=8"]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=500)
    parser.add_argument("--subjects", type=int, default=60)
    parser.add_argument("--work", default="/tmp/cfva-sample")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    work = Path(args.work)
    cli = [sys.executable, "-m", "CounterfactualVACLI"]
    cohort = work / "cohort"
    if not (cohort / "cohort.csv").exists():
        subprocess.run(cli + ["generate", "phantom", "--out", str(cohort), "--n", str(args.subjects), "--spacing", "4", "--seed", str(args.seed)], check=True)
    run = work / "run"
    train = cli + ["train", "--method", "vantgan", "--data", str(cohort / "cohort.csv"), "--out", str(run), "--steps", str(args.steps),
                   *GRID, *NETWORK, "--val-every", "50", "--checkpoint-every", "50", "--seed", str(args.seed)]
    if (run / "checkpoint.pt").exists():
        train.append("--resume")
    subprocess.run(train, check=True)
    with open(run / "log.csv") as f:
        logged = list(csv.DictReader(f))
    minutes = float(logged[-1]["elapsed_seconds"]) / 60  # training wall time, resumed sessions included
    SAMPLES.mkdir(exist_ok=True)
    shutil.copy(run / "model.safetensors", SAMPLES / "vantgan_phantom3d.safetensors")
    shutil.copy(run / "log.csv", SAMPLES / "vantgan_phantom3d_log.csv")
    # the sample scan: the first abnormal subject of the held-out test split
    with open(cohort / "cohort.csv") as f:
        rows = list(csv.DictReader(f))
    test = next(r for r in rows if r["split"] == "test" and r["label"] == "1")
    shutil.copy(cohort / test["path"], SAMPLES / "phantom_atrophy.nii.gz")
    shutil.copy(cohort / test["mask"], SAMPLES / "phantom_atrophy_truth.nii.gz")
    shutil.copy(cohort / "phantom_parameters.json", SAMPLES / "phantom_parameters.json")
    info = {"training_minutes": round(minutes, 1), "sample_subject": test["path"], "steps": args.steps, "subjects": args.subjects}
    (SAMPLES / "sample_build.json").write_text(json.dumps(info, indent=2))
    print(json.dumps(info))
    return 0


if __name__ == "__main__":
    sys.exit(main())
