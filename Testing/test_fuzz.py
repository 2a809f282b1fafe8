"""Property-based fuzz suite (hypothesis) of `counterfactualva attribute`: random volumes (shapes down to one
voxel and one slice, dtypes, zero/negative spacing, oblique/flipped/singular directions, NaN/Inf, constant,
2D/4D/vector, truncated files, edited NIfTI headers) and mutated model files (metadata values, flipped
bytes, truncation), each run in-process through the command line's own entry point and error boundary.

Every case must end in outputs on the input's exact grid or in exit 2 with an `ERROR: <what> — <fix>` line;
never a traceback, a changed input or a leftover temporary file (see fuzz_cases.check_attribution).
About 500 cases per run (CFVA_FUZZ_SCALE multiplies them); benchmarks/fuzz_long.py runs >= 5,000.
"""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest
import SimpleITK as sitk
from fuzz_cases import model_cases, run_model_case, run_volume_case, volume_cases, write_volume_case
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from reliability_support import last_line, tiny_random_model

SCALE = float(os.environ.get("CFVA_FUZZ_SCALE", "1"))
COMMON = dict(deadline=None, database=None, derandomize=True, suppress_health_check=list(HealthCheck), print_blob=True)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    folder = tmp_path_factory.mktemp("fuzz-models")
    return tiny_random_model(folder / "tiny3d.safetensors", 3, size=8), tiny_random_model(folder / "tiny2d.safetensors", 2, size=8, crop="image")


@pytest.fixture(scope="module")
def good_scan(tmp_path_factory):
    path = tmp_path_factory.mktemp("fuzz-scan") / "scan.nrrd"
    rng = np.random.default_rng(0)
    grids = np.meshgrid(*[np.linspace(-1, 1, n) for n in (9, 10, 11)], indexing="ij")
    image = sitk.GetImageFromArray((100.0 * (sum(g**2 for g in grids) < 0.6) + rng.normal(0, 2, (9, 10, 11))).astype(np.float32))
    image.SetSpacing((1.5, 2.0, 2.5))
    sitk.WriteImage(image, str(path))
    return path


def test_fuzz_volumes(models):
    outcomes = []

    @settings(max_examples=int(330 * SCALE), **COMMON)
    @given(case=volume_cases(), use_2d=st.booleans())
    def property_holds(case, use_2d):
        outcomes.append(run_volume_case(case, *models, use_2d=use_2d))

    property_holds()
    # the generator must reach both outcomes often, or the property says little
    assert outcomes.count("ok") >= 0.05 * len(outcomes) and len(outcomes) - outcomes.count("ok") >= 0.3 * len(outcomes), outcomes


def test_fuzz_model_files(models, good_scan):
    outcomes = []

    @settings(max_examples=int(170 * SCALE), **COMMON)
    @given(case=model_cases())
    def property_holds(case):
        outcomes.append(run_model_case(case, models[0], good_scan))

    property_holds()
    assert len(set(outcomes)) >= min(5, len(outcomes) // 4), outcomes  # many different refusals, not one catch-all


@settings(max_examples=4, deadline=None, database=None, derandomize=True, suppress_health_check=list(HealthCheck))
@given(case=volume_cases(max_side=8))
def test_fuzz_through_the_real_command_line(case, tmp_path_factory):
    """A handful through the installed entry point in a fresh process (same contract)."""
    from reliability_support import folder_digest, leftover_temporaries

    folder = tmp_path_factory.mktemp("cli-fuzz")
    model = tiny_random_model(folder / "m.safetensors", 3, size=8)
    (folder / "in").mkdir()
    scan = write_volume_case(case, folder / "in")
    before = folder_digest(folder / "in")
    result = subprocess.run(
        [sys.executable, "-m", "CounterfactualVACLI", "attribute", "--model", str(model), "--input", str(scan), "--out", str(folder / "out"), "--no-figure"],
        capture_output=True, text=True,
    )
    assert "Traceback (most recent call last)" not in result.stderr
    assert folder_digest(folder / "in") == before and not leftover_temporaries(folder)
    if result.returncode == 0:
        assert sitk.ReadImage(str(folder / "out" / f"scan_mask{case.extension}")).GetSize() == sitk.ReadImage(str(scan)).GetSize()
    else:
        assert result.returncode == 2 and last_line(result.stderr).startswith("ERROR: ") and " — " in last_line(result.stderr)
