"""Build the shipped sample: a 3D MNI152 phantom scan with known atrophy and the VANT-GAN of a CPU protocol
(default `benchmarks/protocols/phantom3d_cpu_data_2300.json`), trained by our own `counterfactualva protocol`
command on 2,300 varied-recipe phantoms (recorded in the model's metadata). With 540 subjects
(`--protocol benchmarks/protocols/phantom3d_cpu_more_data.json`, the sample of session 7) or 120
(`phantom3d_cpu.json`) the same configuration and budget score 0.36 or 0.21 instead of 0.57 on the same held-out
patients (docs/results.md).

CPU budget: no GPU is lent to every task, so the sample is what two CPU cores afford: 4 mm phantoms, a
40x48x40 model grid, a light change-predicting U-Net, 25 minutes of training on one core (the protocol trains
two models side by side).

    python benchmarks/make_sample.py [--protocol FILE] [--work runs/phantom3d_cpu_data_2300] [--model vantgan]
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
PROTOCOL = REPO / "benchmarks" / "protocols" / "phantom3d_cpu_data_2300.json"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--protocol", default=str(PROTOCOL), help="the protocol file whose model becomes the sample")
    parser.add_argument("--work", default=None, help="the protocol's run folder, reused if done (default: runs/<protocol name>)")
    parser.add_argument("--model", default="vantgan", help="which of the protocol's models becomes the sample")
    parser.add_argument("--jobs", type=int, default=2)
    args = parser.parse_args()
    protocol = Path(args.protocol).resolve()
    work = Path(args.work) if args.work else REPO / "runs" / protocol.stem
    cli = [sys.executable, "-m", "CounterfactualVACLI"]
    subprocess.run(cli + ["protocol", str(protocol), "--out", str(work), "--jobs", str(args.jobs)], check=True)
    run = work / "models" / args.model
    with open(run / "log.csv") as f:
        logged = list(csv.DictReader(f))
    SAMPLES.mkdir(exist_ok=True)
    shutil.copy(run / "model.safetensors", SAMPLES / "vantgan_phantom3d.safetensors")
    shutil.copy(run / "log.csv", SAMPLES / "vantgan_phantom3d_log.csv")
    # the sample scan: the first abnormal subject of the held-out test split
    cohort = work / "data"
    with open(cohort / "cohort.csv") as f:
        rows = list(csv.DictReader(f))
    test = next(r for r in rows if r["split"] == "test" and r["label"] == "1")
    shutil.copy(cohort / test["path"], SAMPLES / "phantom_atrophy.nii.gz")
    shutil.copy(cohort / test["mask"], SAMPLES / "phantom_atrophy_truth.nii.gz")
    # the cohort's recipe and the sample subject's own draw (the other subjects' draws are the cohort's business)
    parameters = json.loads((cohort / "phantom_parameters.json").read_text())
    parameters["subjects"] = [subject for subject in parameters["subjects"] if subject["image"] == test["path"]]
    (SAMPLES / "phantom_parameters.json").write_text(json.dumps(parameters, indent=2) + "\n")
    results = json.loads((work / "results.json").read_text())
    info = {
        "protocol": protocol.relative_to(REPO).as_posix(),
        "model": args.model,
        "steps_trained": int(logged[-1]["step"]),
        "training_minutes": round(float(logged[-1]["elapsed_seconds"]) / 60, 1),
        "sample_subject": test["path"],
        "training_subjects": sum(r["split"] == "train" for r in rows),
        "test_ncc_by_row": {r["label"]: round(r["paper_rule"]["ncc"], 3) for r in results["results"]},
    }
    (SAMPLES / "sample_build.json").write_text(json.dumps(info, indent=2) + "\n")
    print(json.dumps(info))
    return 0


if __name__ == "__main__":
    sys.exit(main())
