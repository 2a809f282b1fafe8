"""The long fuzz run: the test suite's property-based cases (Testing/fuzz_cases.py), >= 5,000 of them with
fresh random seeds, tallied by outcome. Its figure goes in docs/results.md.

    nice -n 10 env OMP_NUM_THREADS=1 python benchmarks/fuzz_long.py --volumes 4000 --models 1000 --out fuzz_long.json

Exits 1 at the first case that breaks the contract (traceback, changed input, leftover temporary file,
wrong output geometry, exit code other than 0/2, last line not `ERROR: <what> — <fix>`) and prints it.
"""

from __future__ import annotations

import argparse
import collections
import json
import random
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "Testing"))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--volumes", type=int, default=4000, help="random input volumes")
    parser.add_argument("--models", type=int, default=1000, help="mutated model files")
    parser.add_argument("--seed", type=int, default=None, help="hypothesis seed (default: random)")
    parser.add_argument("--out", default=None, help="write the tally as JSON")
    args = parser.parse_args()

    import torch
    from fuzz_cases import model_cases, run_model_case, run_volume_case, volume_cases
    from hypothesis import HealthCheck, given, seed, settings
    from hypothesis import strategies as st
    from reliability_support import tiny_random_model

    torch.set_num_threads(1)
    import numpy as np
    import SimpleITK as sitk

    folder = Path(tempfile.mkdtemp(prefix="cfva-fuzz-long-"))
    model_3d = tiny_random_model(folder / "tiny3d.safetensors", 3, size=8)
    model_2d = tiny_random_model(folder / "tiny2d.safetensors", 2, size=8, crop="image")
    scan = folder / "scan" / "scan.nrrd"
    scan.parent.mkdir()
    grids = np.meshgrid(*[np.linspace(-1, 1, n) for n in (9, 10, 11)], indexing="ij")
    sitk.WriteImage(sitk.GetImageFromArray((100.0 * (sum(g**2 for g in grids) < 0.6)).astype(np.float32) + 1), str(scan))

    tally = {"volumes": collections.Counter(), "models": collections.Counter()}
    common = dict(deadline=None, database=None, suppress_health_check=list(HealthCheck))
    start = time.perf_counter()

    def summary(failed=None) -> dict:
        return {
            "cases": sum(sum(c.values()) for c in tally.values()),
            "seed": base_seed,
            "seconds": round(time.perf_counter() - start, 1),
            "failed": failed,
            "volumes": dict(tally["volumes"].most_common()),
            "models": dict(tally["models"].most_common()),
        }

    def record(kind: str, outcome: str) -> None:
        tally[kind][outcome] += 1
        if args.out and sum(sum(c.values()) for c in tally.values()) % 100 == 0:  # partial figures survive a stop
            Path(args.out).write_text(json.dumps(summary(), indent=2))

    # rounds of 400 volumes + 100 model files (fresh seeds each), so a stopped run has figures for both
    rounds = max(1, -(-args.volumes // 400))
    base_seed = args.seed if args.seed is not None else random.randrange(2**31)
    failed = None
    for round_index in range(rounds):
        n_volumes = min(400, args.volumes - 400 * round_index)
        n_models = -(-args.models // rounds)

        @seed(base_seed + 2 * round_index)
        @settings(max_examples=max(1, n_volumes), **common)
        @given(case=volume_cases(), use_2d=st.booleans())
        def volumes(case, use_2d):
            record("volumes", run_volume_case(case, model_3d, model_2d, use_2d))

        @seed(base_seed + 2 * round_index + 1)
        @settings(max_examples=max(1, n_models), **common)
        @given(case=model_cases())
        def models(case):
            record("models", run_model_case(case, model_3d, scan))

        try:
            volumes()
            models()
        except Exception as exc:  # noqa: BLE001 - report the falsifying case and stop
            failed = f"{type(exc).__name__}: {exc}"
            break
    text = json.dumps(summary(failed), indent=2)
    print(text)
    if args.out:
        Path(args.out).write_text(text)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
