"""Resources/requirements.txt is all the command line needs: installed into a fresh virtual environment (no
system site-packages, the project itself NOT installed, its module folders on PYTHONPATH the way Slicer puts
them on sys.path), every method's attribution and one training step of every method run there through the
command line. A package the code imports but the file lacks (captum was one) fails here, not at a user.

Cost (2 cores): the environment is built once and kept in pytest's cache (.pytest_cache), keyed by the
requirements file, the torch version and the Python version, so a fresh clone (CI) builds it once and a
developer's later runs reuse it (torch from the local wheel ~35 s, the rest ~40 s with pip's cache warm, on an
idle machine); the 14 runs are one driver process (requirements_env_driver.py): ~100 s on a machine loaded
~6x, of which ~50 s are the first imports; a method's own attribution or training step takes 1-15 s.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

torch = pytest.importorskip("torch")

from CounterfactualVALib.checkpoint import ModelMetadata, read_metadata, save_model  # noqa: E402
from CounterfactualVALib.methods import available_methods, create_method  # noqa: E402
from CounterfactualVALib.preprocessing import PreprocessingConfig  # noqa: E402
from CounterfactualVALib.slicer_support.process import CLI_MODULE, child_environment  # noqa: E402
from CounterfactualVALib.slicer_support.requirements import REQUIREMENTS_FILE  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
#: what Slicer puts on sys.path for the two modules (each scripted module's folder)
MODULE_FOLDERS = [REPO / "CounterfactualVA", REPO / "CounterfactualVATraining"]
DRIVER = Path(__file__).with_name("requirements_env_driver.py")
GRID = [32, 32]
GRID_ARGS = ["--spatial-dims", "2", "--size", "32", "32", "--spacing", "1", "1", "--crop", "image", "--intensity", "minmax"]
#: the smallest networks each method builds at a 32x32 grid
TINY = {
    "vantgan": {"ngf": 4, "n_blocks": 1, "ndf": 4, "n_layers_d": 2},
    "antgan": {"ngf": 4, "n_blocks": 1, "ndf": 4, "n_layers_d": 2},
    "agcyclegan": {"ngf": 4, "n_blocks": 1, "ndf": 4, "n_layers_d": 2, "attention_channels": [4, 8], "pool_size": 4},
    "vagan": {"channels": [4, 8, 16], "critic_channels": [4, 8, 8, 16, 16], "critic_iters": 1, "critic_iters_warmup": 1},
    "icam": {
        "content_channels": [4, 8, 8], "content_res_blocks": 1, "attribute_channels": [4, 8, 8], "generator_code_channels": 4,
        "generator_res_blocks": 1, "dis_channels": 4, "dis_layers": 3, "content_dis_channels": 8, "content_dis_layers": 2,
        "rejection_candidates": 4, "grid_size": GRID,  # the grid fixes the classifier's input size (no lazy layer)
    },
    "medxgan": {"z1_dim": 16, "z2_dim": 4, "ngf": 4, "ndf": 4, "validation_inversion_steps": 1},
    "classifier": {"channels": 4},
}
#: attribution options that keep the iterative methods short (the code paths are the same)
FAST_OPTIONS = {
    "icam": ["samples=2", "max_candidates=50"],
    "medxgan": ["inversion_steps=2", "ig_steps=2", "interpolation_frames=2"],
    "classifier": ["explainer=integrated_gradients", "ig_steps=2"],  # captum
}


def _requirements_text() -> str:
    return Path(REQUIREMENTS_FILE).read_text(encoding="utf-8")


def _venv_python(folder: Path) -> Path:
    return folder / ("Scripts/python.exe" if os.name == "nt" else "bin/python")


@pytest.fixture(scope="session")
def requirements_venv(request, tmp_path_factory) -> Path:
    """A virtual environment holding this machine's torch version plus Resources/requirements.txt, nothing else."""
    torch_pin = f"torch=={torch.__version__.split('+')[0]}"
    key = hashlib.sha256(f"{_requirements_text()}\n{torch_pin}\n{sys.version}".encode()).hexdigest()[:16]
    cache = getattr(request.config, "cache", None)
    root = Path(cache.mkdir("requirements_venv")) if cache is not None else tmp_path_factory.mktemp("requirements_venv")
    folder = root / key
    done = folder / "installed.txt"  # written last: an interrupted build is rebuilt
    if done.exists():
        return _venv_python(folder)
    shutil.rmtree(folder, ignore_errors=True)
    for stale in root.iterdir():  # older keys: a changed requirements file or torch
        shutil.rmtree(stale, ignore_errors=True)
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV", "PYTHONHOME")}
    subprocess.run([sys.executable, "-m", "venv", str(folder)], check=True, env=env)
    python = _venv_python(folder)
    # The torch line of the file (a minimum) is satisfied by the pinned torch, as PyTorchUtils satisfies it in Slicer.
    install = subprocess.run(
        [str(python), "-m", "pip", "install", "-q", "--disable-pip-version-check", "--no-compile", torch_pin, "-r", str(REQUIREMENTS_FILE)],
        capture_output=True, text=True, env=env,
    )
    if install.returncode != 0:
        pytest.fail(f"pip could not install {torch_pin} + {REQUIREMENTS_FILE} into a fresh environment:\n{install.stdout[-2000:]}\n{install.stderr[-4000:]}")
    freeze = subprocess.run([str(python), "-m", "pip", "freeze"], capture_output=True, text=True, env=env, check=True)
    done.write_text(freeze.stdout, encoding="utf-8")
    return python


def _model_file(path: Path, method: str, config: dict) -> str:
    """A model file as `train` writes it, with the method's untrained (random) weights."""
    torch.manual_seed(0)
    instance = create_method(method, len(GRID), config)
    preprocessing = PreprocessingConfig(spatial_dims=len(GRID), size=GRID, spacing=[1.0, 1.0], crop="image", intensity="minmax")
    metadata = ModelMetadata(
        method=method, method_config=instance.config, preprocessing=preprocessing.to_dict(),
        networks=list(instance.inference_networks), outputs=list(instance.outputs),
    )
    return str(save_model(path, instance.inference_state_dict(), metadata))


@pytest.fixture(scope="module")
def driver_report(requirements_venv, synthetic_2d, tmp_path_factory):
    """Every method's attribution (random-weight model files) and one training step of every method, run by one
    driver process in the fresh environment; the outer process writes the inputs (the research package that
    generates the cohort is not shipped into Slicer, so it does not exist in there)."""
    work = tmp_path_factory.mktemp("requirements_env")
    scan = next((Path(synthetic_2d).parent / "images").iterdir())
    classifier = _model_file(work / "classifier.safetensors", "classifier", TINY["classifier"])
    runs = []
    for method in available_methods():
        config = dict(TINY[method])
        if method == "medxgan":
            model = _model_file(work / "medxgan.safetensors", method, {**config, "classifier_config": TINY["classifier"], "grid_shape": GRID})
        else:
            model = _model_file(work / f"{method}.safetensors", method, config)
        options = [f"--option={pair}" for pair in FAST_OPTIONS.get(method, [])]
        runs.append({"name": f"attribute {method}", "out": str(work / "attribute" / method),
                     "argv": ["attribute", "--model", model, "--input", str(scan), "--out", str(work / "attribute" / method), "--device", "cpu", *options]})
        if method == "medxgan":
            config["classifier_model"] = classifier
        train_config = [f"--config={key}={json.dumps(value)}" for key, value in config.items()]
        runs.append({"name": f"train {method}", "out": str(work / "train" / method),
                     "argv": ["train", "--method", method, "--data", str(synthetic_2d), "--out", str(work / "train" / method), *GRID_ARGS,
                              "--steps", "1", "--batch-size", "2", "--val-every", "1", "--checkpoint-every", "1", "--device", "cpu", *train_config]})
    plan, report = work / "plan.json", work / "report.json"
    plan.write_text(json.dumps({"runs": runs}), encoding="utf-8")
    base = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV", "PYTHONHOME")}
    env = child_environment(MODULE_FOLDERS, device="cpu", base={**base, "PYTHONNOUSERSITE": "1", "OMP_NUM_THREADS": "1"})
    # from an empty folder: neither the repository root (research package, installed copies) nor Testing/ is on sys.path
    result = subprocess.run([str(requirements_venv), str(DRIVER), str(plan), str(report)], capture_output=True, text=True, env=env, cwd=work)
    assert result.returncode == 0, result.stderr[-4000:]
    outcome = json.loads(report.read_text(encoding="utf-8"))
    outcome["plan"] = {run["name"]: run for run in runs}
    return outcome


def test_the_environment_holds_only_the_requirements_and_the_module_folders(driver_report, requirements_venv):
    origins = driver_report["origins"]
    venv = Path(driver_report["prefix"]).resolve()
    assert venv == requirements_venv.parent.parent.resolve() != Path(driver_report["base_prefix"]).resolve()
    assert Path(origins["torch"]).resolve().is_relative_to(venv), "torch came from outside the fresh environment"
    for package, folder in (("CounterfactualVALib", "CounterfactualVA"), ("CounterfactualVACLI", "CounterfactualVA"),
                            ("CounterfactualVATrainingLib", "CounterfactualVATraining")):
        assert Path(origins[package]).resolve().is_relative_to(REPO / folder), f"{package} not taken from the module folder"
    assert origins["CounterfactualVAResearch"] is None, "the research package is not shipped into Slicer: it must not be importable"
    installed = (requirements_venv.parent.parent / "installed.txt").read_text().lower()
    assert "counterfactualva" not in installed and "tensorboard" not in installed


@pytest.mark.parametrize("method", available_methods())
def test_attribution_runs_from_the_requirements_alone(driver_report, method):
    run = next(r for r in driver_report["runs"] if r["name"] == f"attribute {method}")
    assert run["code"] == 0, f"{run['name']} failed in the fresh environment:\n{run['stderr']}"
    out = Path(driver_report["plan"][run["name"]]["out"])
    summary = json.loads((out / "summary.json").read_text())
    amap = sitk.GetArrayFromImage(sitk.ReadImage(str(out / summary["outputs"]["attribution"])))
    assert amap.shape == (32, 32) and np.isfinite(amap).all()
    assert (out / summary["outputs"]["mask"]).exists()
    if summary["outputs"]["counterfactual"]:  # the classifier baselines explain without one
        assert (out / summary["outputs"]["counterfactual"]).exists()
    assert any(out.glob("*_figure.png")), "no figure (Pillow)"


@pytest.mark.parametrize("method", available_methods())
def test_one_training_step_runs_from_the_requirements_alone(driver_report, method):
    run = next(r for r in driver_report["runs"] if r["name"] == f"train {method}")
    assert run["code"] == 0, f"{run['name']} failed in the fresh environment:\n{run['stderr']}"
    out = Path(driver_report["plan"][run["name"]]["out"])
    metadata = read_metadata(out / "model.safetensors")
    assert metadata.method == method and metadata.training["steps"] == 1
    assert (out / "log.csv").read_text().count("\n") >= 2
