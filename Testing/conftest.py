"""Shared fixtures: tiny cohorts and models made by our own generators and training command."""

from __future__ import annotations

import os

import numpy as np
import pytest
import SimpleITK as sitk

os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")  # CI is CPU-only; keep local runs comparable
os.environ.setdefault("OMP_NUM_THREADS", "1")  # tiny tensors: threads only add spin-wait overhead, and subprocess tests would oversubscribe 2 cores

TINY_VANTGAN = ["ngf=8", "n_blocks=2", "ndf=8"]


def tiny_method_config(pairs=TINY_VANTGAN) -> dict:
    from CounterfactualVACLI.cli import _key_values

    return _key_values(pairs)


@pytest.fixture(scope="session")
def synthetic_2d(tmp_path_factory):
    """40 synthetic 32x32 images (VA-GAN recipe, scaled down) with masks and a stratified split."""
    from CounterfactualVAResearch.data.synthetic import generate_synthetic

    return generate_synthetic(tmp_path_factory.mktemp("synthetic2d"), n=40, size=32, spatial_dims=2, seed=0)


@pytest.fixture(scope="session")
def tiny_2d_model(synthetic_2d, tmp_path_factory):
    """A VANT-GAN trained for a few steps by the shared loop (not a good model: a valid model file)."""
    from CounterfactualVATrainingLib.loop import TrainingConfig, train

    out = tmp_path_factory.mktemp("tiny2d_run")
    config = TrainingConfig(
        method="vantgan",
        data=str(synthetic_2d),
        out=str(out),
        preprocessing={"spatial_dims": 2, "size": [32, 32], "spacing": [1.0, 1.0], "crop": "image", "intensity": "minmax"},
        method_config=tiny_method_config(),
        steps=4,
        val_every=4,
        checkpoint_every=4,
        command="pytest tiny_2d_model",
    )
    return train(config)


def make_oblique_volume(size=(40, 36, 24), spacing=(1.1, 0.9, 2.5), origin=(-37.5, 12.25, 80.0), angles=(0.3, -0.2, 0.5), seed=0):
    """An anisotropic, oblique, non-zero-origin 3D 'head': a smooth bright ellipsoid on a dark background,
    with a small bright blob off-centre so misalignment shows up."""
    rng = np.random.default_rng(seed)
    zz, yy, xx = np.meshgrid(*[np.arange(n, dtype=np.float32) for n in reversed(size)], indexing="ij")
    centre = [(n - 1) / 2 for n in reversed(size)]
    radii = [0.38 * n for n in reversed(size)]
    r2 = sum(((g - c) / r) ** 2 for g, c, r in zip((zz, yy, xx), centre, radii))
    array = np.where(r2 < 1, 100.0, 0.0).astype(np.float32)
    blob = ((zz - centre[0]) ** 2 / 4 + (yy - centre[1] - 5) ** 2 / 9 + (xx - centre[2] + 6) ** 2 / 9) < 1
    array[blob] += 80
    array += rng.normal(0, 1.0, array.shape).astype(np.float32)
    image = sitk.GetImageFromArray(array)
    image.SetSpacing(spacing)
    image.SetOrigin(origin)
    rotation = sitk.Euler3DTransform()
    rotation.SetRotation(*angles)
    image.SetDirection(rotation.GetMatrix())
    return image


# --- process exit -----------------------------------------------------------------------------------
# Every test passed, the summary was printed, and then the interpreter's own teardown crashed with a
# segmentation fault in 2 of 3 fresh-clone runs on 2026-12-02 (make test: "385 passed", then rc 2): the
# finalisers of the native libraries one test process holds together (torch, slicer-core's VTK/MRML,
# SimpleITK, matplotlib) are not safe to run in every order. No user-facing process loads them all (the CLI
# and the worker load no slicer), and the cause is not found yet: `make test` runs under faulthandler so that
# a crash *during* the tests still prints its stack. After pytest has decided its exit status, the process
# ends with that status without running the finalisers.
def pytest_sessionfinish(session, exitstatus):
    session.config.stash[_EXIT_STATUS] = int(exitstatus)


@pytest.hookimpl(trylast=True)
def pytest_unconfigure(config):
    status = config.stash.get(_EXIT_STATUS, None)
    if status is None or os.environ.get("COUNTERFACTUALVA_TEST_FINALIZE") == "1":  # opt back in to look for the cause
        return
    import sys

    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(status)


_EXIT_STATUS = pytest.StashKey[int]()
