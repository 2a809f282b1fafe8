"""A training request of the training module, without Qt or slicer: the panel's text fields parsed, the
arguments checked before anything is launched, the ``train`` command line, and the request file a run folder
keeps so that Resume starts the same run.

The module's logic (``CounterfactualVATrainingLogic``) exposes these under its console names (parseNumbers,
parseHyperParameters, methodDefaults, buildCommand, validate); the cohort itself is checked by its
``datasetPreview`` (:mod:`.training_data`).
"""

from __future__ import annotations

import json
import os
import re
import shlex
import tempfile

from CounterfactualVALib.devices import DEVICES
from CounterfactualVALib.methods import available_methods
from CounterfactualVALib.preprocessing import CROPS, INTENSITIES
from CounterfactualVALib.run_files import CHECKPOINT_NAME, MODEL_NAME
from CounterfactualVALib.slicer_support.process import CLI_MODULE

#: the choices of `counterfactualva train`, from where the command line takes them (none imports torch)
METHODS = tuple(available_methods())
SPATIAL_DIMS = (3, 2)
#: the request file in the run folder: the arguments a run was started with, and its command
REQUEST_NAME = "CounterfactualVATraining.json"


def parse_numbers(text, kind=float, name="value") -> list:
    """'64 64 64' or '64,64,64' -> [64, 64, 64]."""
    if isinstance(text, (list, tuple)):
        return [kind(v) for v in text]
    parts = [p for p in re.split(r"[\s,;x]+", str(text).strip()) if p]
    try:
        return [kind(float(p)) if kind is int else kind(p) for p in parts]
    except ValueError:
        raise ValueError(f"{name}: expected numbers separated by spaces, got {text!r}.") from None


def parse_hyper_parameters(text) -> dict:
    """Method settings as ``key=value`` pairs separated by whitespace or new lines (``#`` starts a comment;
    quote a value that contains spaces). Values are parsed as JSON when they parse (numbers, booleans,
    lists), else kept as text: the rule of ``counterfactualva train --config``."""
    if isinstance(text, dict):
        return dict(text)
    config = {}
    for token in shlex.split(str(text or ""), comments=True):
        key, sep, value = token.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"Method settings: expected key=value, got {token!r} (one pair per line, e.g. ngf=32).")
        try:
            config[key.strip()] = json.loads(value)
        except json.JSONDecodeError:
            config[key.strip()] = value
    return config


def method_defaults(method: str) -> dict:
    """{"title", "config" (the method's hyper-parameters and defaults), "training" (batch size, ...)}.
    Imports the method's code (torch)."""
    if method not in METHODS:
        raise ValueError(f"Unknown method {method!r}. Known methods: {', '.join(METHODS)}.")
    from CounterfactualVALib.methods import get_method_class

    cls = get_method_class(method)
    return {"title": cls.title or method, "config": dict(cls.default_config), "training": dict(cls.training_defaults)}


def panel_train_arguments(panel) -> dict:
    """train() keywords from the panel's fields (`panel`: the parameter node, or any object with its fields:
    method, steps, batchSize (0: the method's default), spatialDims, size and spacing as text, crop, intensity,
    device, hyperParameters as text, timeBudgetMinutes (0: no limit))."""
    return dict(
        method=panel.method, steps=int(panel.steps), batchSize=int(panel.batchSize) or None, spatialDims=int(panel.spatialDims),
        size=parse_numbers(panel.size, int, "size"), spacing=parse_numbers(panel.spacing, float, "spacing"), crop=panel.crop,
        intensity=panel.intensity, device=panel.device, config=parse_hyper_parameters(panel.hyperParameters),
        timeBudget=float(panel.timeBudgetMinutes) or None,
    )


def check_writable(outputFolder) -> str:
    """The absolute output folder, made if needed; ValueError when none is given or it cannot be written."""
    folder = os.path.abspath(str(outputFolder or ""))
    if not str(outputFolder or "").strip() or str(outputFolder) == ".":
        raise ValueError("No output folder: choose a folder for the run (checkpoint, log and model are written there).")
    try:
        os.makedirs(folder, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".write-test-", dir=folder)
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        raise ValueError(f"The output folder {folder} is not writable ({exc.strerror or exc}). Choose another folder.") from None
    return folder


def build_command(python, csvPath, outputFolder, method="vantgan", steps=1000, batchSize=None, spatialDims=3, size=(64, 64, 64),
                  spacing=(3.0, 3.0, 3.0), device="auto", config=None, resume=False, crop="foreground", intensity="percentile",
                  orientation="RAS", seed=0, logEvery=None, valEvery=None, checkpointEvery=None, timeBudget=None,
                  cacheFolder=None) -> list:
    """``python -m CounterfactualVACLI train ... --progress``; None (or 0) leaves a setting at the command line's default."""
    command = [
        python, "-m", CLI_MODULE, "train",
        "--method", method, "--data", str(csvPath), "--out", str(outputFolder), "--steps", str(int(steps)),
        "--spatial-dims", str(int(spatialDims)), "--size", *[str(int(s)) for s in size],
        "--spacing", *[repr(float(s)) for s in spacing], "--crop", crop, "--intensity", intensity,
        "--device", device, "--seed", str(int(seed)),
    ]
    if int(spatialDims) == 3:
        command += ["--orientation", orientation]
    if batchSize:
        command += ["--batch-size", str(int(batchSize))]
    for flag, value in (("--log-every", logEvery), ("--val-every", valEvery), ("--checkpoint-every", checkpointEvery)):
        if value:
            command += [flag, str(int(value))]
    if timeBudget:
        command += ["--time-budget", repr(float(timeBudget))]
    if cacheFolder:
        command += ["--cache-dir", str(cacheFolder)]
    for key, value in (config or {}).items():
        command += ["--config", f"{key}={json.dumps(value)}"]
    if resume:
        command.append("--resume")
    return command + ["--progress"]


def check_arguments(csvPath, outputFolder, method, steps, batchSize, spatialDims, size, spacing, device, config, crop, intensity,
                    resume, overwrite, timeBudget=None) -> str:
    """Raise ValueError with what is wrong and what to do (the cohort's contents aside); returns the absolute
    output folder."""
    if method not in METHODS:
        raise ValueError(f"Unknown method {method!r}. Known methods: {', '.join(METHODS)}.")
    if device not in DEVICES:
        raise ValueError(f"Unknown device {device!r}: use one of {', '.join(DEVICES)}.")
    if crop not in CROPS:
        raise ValueError(f"Unknown crop {crop!r}: use one of {', '.join(CROPS)}.")
    if intensity not in INTENSITIES:
        raise ValueError(f"Unknown intensity normalisation {intensity!r}: use one of {', '.join(INTENSITIES)}.")
    if int(spatialDims) not in (2, 3):
        raise ValueError(f"spatialDims must be 2 or 3, got {spatialDims!r}.")
    if len(size) != int(spatialDims) or any(int(s) < 1 for s in size):
        raise ValueError(f"The model grid size must be {spatialDims} positive numbers of voxels (x y{' z' if int(spatialDims) == 3 else ''}), got {list(size)}.")
    if len(spacing) != int(spatialDims) or any(not float(s) > 0 for s in spacing):
        raise ValueError(f"The model grid spacing must be {spatialDims} positive numbers (mm), got {list(spacing)}.")
    if int(steps) < 1:
        raise ValueError(f"steps must be at least 1, got {steps}.")
    if batchSize is not None and int(batchSize) < 1:
        raise ValueError(f"batchSize must be at least 1 (or None for the method's default), got {batchSize}.")
    if timeBudget is not None and not float(timeBudget) >= 0:
        raise ValueError(f"timeBudget must be a number of minutes (0 or None: no limit), got {timeBudget!r}.")
    if not csvPath or not os.path.isfile(str(csvPath)):
        raise ValueError(
            f"Cohort CSV not found: {csvPath or '(none given)'}. Give a CSV with columns path,label (label 0 = normal, 1 = abnormal), "
            "or use datasetPreview(normalFolder=..., abnormalFolder=...) to write one from two folders."
        )
    folder = check_writable(outputFolder)
    checkpoint = os.path.join(folder, CHECKPOINT_NAME)
    if resume and not os.path.isfile(checkpoint):
        raise ValueError(f"Nothing to resume: {checkpoint} does not exist. Start a new run (resume=False), or choose the folder of the stopped run.")
    existing = [name for name in (CHECKPOINT_NAME, MODEL_NAME) if os.path.isfile(os.path.join(folder, name))]
    if not resume and not overwrite and existing:
        raise ValueError(
            f"{folder} already holds a training run ({', '.join(existing)}). Resume it (resume=True), choose another output "
            "folder, or pass overwrite=True to start again."
        )
    if config:
        try:
            known = method_defaults(method)["config"]
        except ImportError:
            known = None  # torch is not installed here; the training process will check
        if known is not None:
            unknown = sorted(set(config) - set(known))
            if unknown:
                raise ValueError(f"{method}: unknown setting(s) {', '.join(unknown)}. Known: {', '.join(sorted(known)) or 'none'}.")
    return folder


def write_request(folder, arguments: dict, command: list) -> None:
    path = os.path.join(folder, REQUEST_NAME)
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump({"arguments": arguments, "command": command}, f, indent=1)
    os.replace(tmp, path)


def read_request(folder) -> dict:
    """The arguments the run in `folder` was started with by this module; ValueError when it was not."""
    path = os.path.join(os.path.abspath(str(folder)), REQUEST_NAME)
    if not os.path.isfile(path):
        raise ValueError(f"{folder} holds no run started by this module ({REQUEST_NAME} is missing). Call train(..., resume=True) with the run's settings.")
    with open(path, encoding="utf-8") as f:
        return json.load(f)["arguments"]
