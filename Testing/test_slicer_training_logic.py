"""The training module's logic against slicer-core's real MRML scene (no Qt, no application).

Dataset preview (counts, splits, one-class and unreadable-file problems, the CSV written from two folders),
clear errors before anything is launched, the real `counterfactualva train` in a subprocess driven through
the logic (progress, log table, loss chart, model recorded), stop with a checkpoint and resume, and the
agreement of the module code, its .ui file and the command line.
"""

from __future__ import annotations

import ast
import json
import os
import re
import shutil
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

slicer = pytest.importorskip("slicer")
if not hasattr(slicer, "vtkMRMLScene"):
    pytest.skip("slicer-core (MRML) is not installed", allow_module_level=True)

REPO = Path(__file__).resolve().parents[1]
MODULE_DIR = REPO / "CounterfactualVATraining"
if str(MODULE_DIR) not in sys.path:
    sys.path.insert(0, str(MODULE_DIR))

import CounterfactualVATraining as module  # noqa: E402
from CounterfactualVATraining import CounterfactualVATrainingLogic  # noqa: E402

TINY = {"ngf": 8, "n_blocks": 2, "ndf": 8}
GRID_2D = dict(spatialDims=2, size=(32, 32), spacing=(1, 1), crop="image", intensity="minmax", device="cpu", config=TINY)


# --- fixtures -------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
    """24 synthetic 32x32 images (12 normal, 12 abnormal) with masks and a split column."""
    from CounterfactualVAResearch.data.synthetic import generate_synthetic

    return Path(generate_synthetic(tmp_path_factory.mktemp("cohort2d"), n=24, size=32, spatial_dims=2, seed=0))


@pytest.fixture
def scene():
    scene = slicer.vtkMRMLScene()
    yield scene
    scene.Clear(1)


@pytest.fixture(autouse=True)
def model_registry(tmp_path, monkeypatch):
    """Trained models are recorded into a per-test file, never into the user's home. The training processes
    (which inherit this environment) use one thread: these models are tiny, and on a busy 2-core machine two
    OpenMP threads per process made each step ~100x slower."""
    path = tmp_path / "registry" / "trained_models.json"
    monkeypatch.setenv("COUNTERFACTUALVA_TRAINED_MODELS", str(path))
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    return path


def cohort_rows(csv_path):
    from CounterfactualVALib.cohort import read_cohort_csv

    return read_cohort_csv(csv_path)


def write_csv(path, rows):
    from CounterfactualVALib.cohort import write_cohort_csv

    return write_cohort_csv(path, rows)


def table_columns(table):
    return [table.GetColumnName(i) for i in range(table.GetNumberOfColumns())]


def chart_series(chart):
    return [chart.GetNthPlotSeriesNode(i) for i in range(chart.GetNumberOfPlotSeriesNodes())]


# --- the module file under slicer-core --------------------------------------------------------------------


def test_module_imports_under_slicer_core_without_qt():
    assert module.HAVE_SLICER_APP is False
    assert module.ScriptedLoadableModuleLogic is None and CounterfactualVATrainingLogic.__mro__[-1] is object  # no stand-in base class for the logic
    assert module.CounterfactualVATrainingParameterNode is None
    with pytest.raises(RuntimeError, match="needs the 3D Slicer application"):
        module.CounterfactualVATrainingWidget().setup()
    with pytest.raises(RuntimeError, match="Parameter nodes need"):
        CounterfactualVATrainingLogic().getParameterNode()
    assert CounterfactualVATrainingLogic().scene is None  # slicer-core has no slicer.mrmlScene
    parent = module.CounterfactualVATraining(None).parent
    assert parent.title and "train" in parent.helpText.lower()


def test_choices_match_the_command_line_and_the_registry():
    from CounterfactualVACLI.cli import build_parser
    from CounterfactualVALib.methods import available_methods

    assert module.METHODS == tuple(available_methods())
    train = build_parser()._subparsers._group_actions[0].choices["train"]
    choices = {action.dest: tuple(action.choices) for action in train._actions if action.choices}
    assert choices["device"] == module.DEVICES
    assert choices["crop"] == module.CROPS
    assert choices["intensity"] == module.INTENSITIES
    assert set(choices["spatial_dims"]) == set(module.SPATIAL_DIMS)


def test_command_parses_with_the_real_command_line_and_the_child_environment():
    from CounterfactualVACLI.cli import _key_values, build_parser

    logic = CounterfactualVATrainingLogic()
    config = {"ngf": 8, "name": "a b", "flag": True, "scales": [1, 2]}
    command = logic.buildCommand(
        "/d/cohort.csv", "/runs/r", method="vagan", steps=7, batchSize=2, spatialDims=2, size=(32, 30), spacing=(1, 1.5),
        device="cpu", config=config, resume=True, crop="image", intensity="minmax", logEvery=1, valEvery=5, checkpointEvery=5,
        timeBudget=12.5, cacheFolder="/cache/grid",
    )
    assert command[0] == sys.executable
    assert command[1:4] == ["-m", "CounterfactualVACLI", "train"]
    assert command[-1] == "--progress"
    args = build_parser().parse_args(command[3:])
    assert (args.method, args.data, args.out, args.steps, args.batch_size) == ("vagan", "/d/cohort.csv", "/runs/r", 7, 2)
    assert (args.spatial_dims, args.size, args.spacing, args.crop, args.intensity) == (2, [32, 30], [1.0, 1.5], "image", "minmax")
    assert (args.device, args.resume, args.log_every, args.val_every, args.checkpoint_every) == ("cpu", True, 1, 5, 5)
    assert _key_values(args.config) == config
    assert args.time_budget == 12.5  # the panel's 'Time budget' (minutes)
    assert args.cache_dir == "/cache/grid"
    assert "--orientation" not in command  # 2D
    defaults = build_parser().parse_args(logic.buildCommand("c.csv", "o")[3:])
    assert defaults.batch_size is None and not defaults.resume and defaults.orientation == "RAS" and defaults.config is None
    assert defaults.time_budget is None and "--time-budget" not in logic.buildCommand("c.csv", "o", timeBudget=0)  # 0: no limit
    assert defaults.cache_dir is None and defaults.select_on == "map"

    env = logic.childEnvironment("cpu")
    folders = env["PYTHONPATH"].split(os.pathsep)
    assert str(REPO / "CounterfactualVA") in folders and str(REPO / "CounterfactualVATraining") in folders
    assert env["CUDA_VISIBLE_DEVICES"] == "-1" and env["PYTHONUNBUFFERED"] == "1"
    assert logic.childEnvironment("auto").get("CUDA_VISIBLE_DEVICES") == os.environ.get("CUDA_VISIBLE_DEVICES")
    check = subprocess.run(
        [sys.executable, "-c", "import CounterfactualVACLI.cli, CounterfactualVATrainingLib; print('ok')"],
        env=env, cwd="/", capture_output=True, text=True, timeout=60,
    )
    assert check.stdout.strip() == "ok", check.stderr


def test_progress_lines_and_panel_text_are_parsed():
    from CounterfactualVALib.slicer_support.process import parse_progress
    from CounterfactualVATrainingLib.slicer_support.training_process import parse_step

    line = "PROGRESS 0.167 step 1/6 loss_g=15.06 loss_gan=2.747 val_ncc=0.05 val_score=-1e-3"
    fraction, text = parse_progress(line)
    step, total, values = parse_step(text)
    assert (fraction, step, total) == (0.167, 1, 6)
    assert values == {"loss_g": 15.06, "loss_gan": 2.747, "val_ncc": 0.05, "val_score": -1e-3}
    assert parse_step(parse_progress("PROGRESS 0.5 Loading")[1]) is None
    assert parse_progress("Model written to x") is None

    logic = CounterfactualVATrainingLogic()
    text = "ngf=8\nn_blocks=2   # fewer blocks\nlambda_cycle=10.5 name='two words' use_x=true\n"
    assert logic.parseHyperParameters(text) == {"ngf": 8, "n_blocks": 2, "lambda_cycle": 10.5, "name": "two words", "use_x": True}
    assert logic.parseHyperParameters("") == {}
    with pytest.raises(ValueError, match="expected key=value"):
        logic.parseHyperParameters("ngf 8")
    assert logic.parseNumbers("64 64, 32", int) == [64, 64, 32]
    assert logic.parseNumbers("1.5 2", float) == [1.5, 2.0]
    with pytest.raises(ValueError, match="size"):
        logic.parseNumbers("64 big", int, "size")
    defaults = logic.methodDefaults("vantgan")
    assert defaults["title"] == "VANT-GAN" and "ngf" in defaults["config"]


def test_panel_fields_reach_the_command_line_unchanged():
    """What Start does with the panel's fields (defaults of the parameter node, as the .ui shows them, with a
    time budget and method settings typed in): train() keywords whose command the real parser reads back."""
    from types import SimpleNamespace

    from CounterfactualVACLI.cli import _key_values, build_parser
    from CounterfactualVATrainingLib.slicer_support import training_process, training_request

    panel = SimpleNamespace(method="vagan", steps=250, batchSize=0, spatialDims=3, size="48 56 48", spacing="2.5, 2.5, 2.5",
                            crop="foreground", intensity="percentile", device="cpu", hyperParameters="lambda_l1=29\nchannels=[8,16]",
                            timeBudgetMinutes=45.0)
    arguments = training_request.panel_train_arguments(panel)
    assert arguments["batchSize"] is None and arguments["timeBudget"] == 45.0
    args = build_parser().parse_args(CounterfactualVATrainingLogic().buildCommand("c.csv", "/runs/r", **arguments)[3:])
    assert (args.method, args.steps, args.batch_size, args.size, args.spacing) == ("vagan", 250, None, [48, 56, 48], [2.5, 2.5, 2.5])
    assert args.time_budget == 45.0 and _key_values(args.config) == {"lambda_l1": 29, "channels": [8, 16]}
    panel.timeBudgetMinutes = 0.0  # the spin box's 'no limit'
    assert training_request.panel_train_arguments(panel)["timeBudget"] is None
    shown = training_process.live_values_text({"loss_g": 1.23456, "val_ncc": 0.5, "step_seconds": 2.0, "loss_d": 0.1})
    assert shown == "loss_g 1.235   loss_d 0.1   val_ncc 0.5"


# --- dataset preview ----------------------------------------------------------------------------------------


def test_preview_counts_classes_and_splits(cohort):
    logic = CounterfactualVATrainingLogic()
    preview = logic.datasetPreview(csvPath=cohort, spatialDims=2)
    assert preview["problems"] == []
    assert preview["counts"] == {"normal": 12, "abnormal": 12}
    rows = cohort_rows(cohort)
    assert preview["splitSource"] == "csv"
    for split, counts in preview["splits"].items():
        assert counts["normal"] == sum(1 for r in rows if r["split"] == split and r["label"] == 0)
        assert counts["abnormal"] == sum(1 for r in rows if r["split"] == split and r["label"] == 1)
    assert preview["csv"] == str(cohort)
    assert "12 normal, 12 abnormal" in logic.describePreview(preview) and "Ready to train" in logic.describePreview(preview)
    # a 3D model cannot take these 2D images
    problems = logic.datasetPreview(csvPath=cohort, spatialDims=3)["problems"]
    assert len(problems) == 1 and "do not fit the model" in problems[0] and "img_00000.nii.gz" in problems[0]


def test_preview_of_two_folders_writes_the_cohort_csv(cohort, tmp_path):
    logic = CounterfactualVATrainingLogic()
    normal, abnormal = tmp_path / "controls", tmp_path / "patients" / "site1"
    normal.mkdir()
    abnormal.mkdir(parents=True)
    for r in cohort_rows(cohort):
        shutil.copy(r["path"], (normal if r["label"] == 0 else abnormal) / Path(r["path"]).name)
    (normal / "notes.txt").write_text("not an image")  # ignored: not an image extension
    out = tmp_path / "run"
    preview = logic.datasetPreview(normalFolder=normal, abnormalFolder=tmp_path / "patients", outputFolder=out)
    assert preview["problems"] == []
    assert preview["counts"] == {"normal": 12, "abnormal": 12}
    assert preview["csv"] == str(out / "cohort.csv")
    rows = cohort_rows(preview["csv"])
    assert sorted(Path(r["path"]).parent.name for r in rows if r["label"] == 1) == ["site1"] * 12  # searched recursively
    assert all(Path(r["path"]).parent == normal for r in rows if r["label"] == 0)
    assert preview["splitSource"] == "automatic"
    assert sum(c["normal"] + c["abnormal"] for c in preview["splits"].values()) == 24
    assert preview["splits"]["train"]["normal"] and preview["splits"]["train"]["abnormal"] and preview["splits"]["val"]["normal"]
    # the split shown is the one training makes
    from CounterfactualVATrainingLib.data import load_cohort

    splits = load_cohort(preview["csv"])
    assert {name: {"normal": sum(r["label"] == 0 for r in recs), "abnormal": sum(r["label"] == 1 for r in recs)} for name, recs in splits.items() if recs} == preview["splits"]


def test_preview_reports_a_one_class_dataset(cohort, tmp_path):
    logic = CounterfactualVATrainingLogic()
    normal, empty = tmp_path / "controls", tmp_path / "patients"
    normal.mkdir()
    empty.mkdir()
    for r in cohort_rows(cohort):
        if r["label"] == 0:
            shutil.copy(r["path"], normal / Path(r["path"]).name)
    preview = logic.datasetPreview(normalFolder=normal, abnormalFolder=empty, outputFolder=tmp_path / "run")
    assert preview["counts"] == {"normal": 12, "abnormal": 0}
    text = " ".join(preview["problems"])
    assert "holds no image files" in text and str(empty) in text
    assert "needs both classes" in text and "abnormal folder" in text

    csv_path = write_csv(tmp_path / "normals.csv", [r for r in cohort_rows(cohort) if r["label"] == 0])
    preview = logic.datasetPreview(csvPath=csv_path)
    assert len(preview["problems"]) == 1
    assert "Only normal images" in preview["problems"][0] and "label 1" in preview["problems"][0]


def test_preview_names_unreadable_files(cohort, tmp_path):
    logic = CounterfactualVATrainingLogic()
    rows = cohort_rows(cohort)
    (tmp_path / "broken.nii.gz").write_bytes(b"this is not a NIfTI file")
    rows.append({"path": str(tmp_path / "broken.nii.gz"), "label": 1})
    rows.append({"path": str(tmp_path / "missing.nrrd"), "label": 0})
    rows.append({"path": rows[0]["path"], "label": 1, "mask": str(tmp_path / "nomask.nii.gz")})
    csv_path = write_csv(tmp_path / "cohort.csv", rows)
    preview = logic.datasetPreview(csvPath=csv_path)
    assert preview["counts"] == {"normal": 13, "abnormal": 14}
    assert sorted(Path(p).name for p in preview["unreadable"]) == ["broken.nii.gz", "missing.nrrd", "nomask.nii.gz"]
    (problem,) = preview["problems"]
    assert "3 file(s) cannot be read" in problem
    assert "broken.nii.gz (image: not an image SimpleITK can read" in problem
    assert "missing.nrrd (image: file not found)" in problem and "nomask.nii.gz (mask: file not found)" in problem
    assert "Fix or remove" in problem
    # a bad CSV is a problem too, not an exception
    (tmp_path / "bad.csv").write_text("file,class\na.nii,0\n")
    preview = logic.datasetPreview(csvPath=tmp_path / "bad.csv")
    assert "lacks the column" in preview["problems"][0]
    with pytest.raises(ValueError, match="either a cohort CSV or the two folders"):
        logic.datasetPreview(csvPath=cohort, normalFolder=tmp_path)


# --- errors before launching ------------------------------------------------------------------------------------


def test_train_refuses_bad_input_before_launching(cohort, tmp_path, scene, monkeypatch):
    def no_launch(*args, **kwargs):
        raise AssertionError("a process was launched")

    from CounterfactualVALib.slicer_support import process as processes

    monkeypatch.setattr(processes.subprocess, "Popen", no_launch)
    logic = CounterfactualVATrainingLogic(scene=scene)
    out = tmp_path / "run"

    def train(csv=cohort, output=out, **kwargs):
        return logic.train(csv, output, **{**GRID_2D, "steps": 2, **kwargs})

    with pytest.raises(ValueError, match="Cohort CSV not found: .*missing.csv"):
        train(csv=tmp_path / "missing.csv")
    with pytest.raises(ValueError, match=r"Unknown method 'vant-gan'. Known methods: vantgan, antgan, vagan, icam, medxgan"):
        train(method="vant-gan")
    one_class = write_csv(tmp_path / "abnormal_only.csv", [r for r in cohort_rows(cohort) if r["label"] == 1])
    with pytest.raises(ValueError, match="Only abnormal images .*needs both classes"):
        train(csv=one_class)
    rows = cohort_rows(cohort) + [{"path": str(tmp_path / "gone.nii.gz"), "label": 0}]
    with pytest.raises(ValueError, match=r"cannot be read: gone.nii.gz \(image: file not found\)"):
        train(csv=write_csv(tmp_path / "with_missing.csv", rows))
    (tmp_path / "afile").write_text("x")
    with pytest.raises(ValueError, match="output folder .*afile/run is not writable"):
        train(output=tmp_path / "afile" / "run")
    with pytest.raises(ValueError, match="No output folder"):
        train(output="")
    with pytest.raises(ValueError, match=r"vantgan: unknown setting\(s\) ngff. Known: .*ngf"):
        train(config={"ngff": 8})
    with pytest.raises(ValueError, match="Nothing to resume"):
        train(resume=True)
    with pytest.raises(ValueError, match="grid size must be 2"):
        train(size=(32, 32, 32))
    with pytest.raises(ValueError, match="Unknown device"):
        train(device="gpu")
    with pytest.raises(ValueError, match="timeBudget must be a number of minutes"):
        train(timeBudget=-1)
    (out / "checkpoint.pt").write_bytes(b"")
    with pytest.raises(ValueError, match="already holds a training run .*overwrite=True"):
        train()
    with pytest.raises(ValueError, match="holds no run started by this module"):
        logic.resume(tmp_path)
    assert scene.GetNumberOfNodesByClass("vtkMRMLTableNode") == 0  # nothing was made


# --- training through the subprocess ---------------------------------------------------------------------------


def test_self_test_trains_a_tiny_model_under_slicer_core():
    """The module's own self-test (what Slicer's 'Reload and Test' runs): the real command line, polled like
    the panel's timer, on a tiny 2D VANT-GAN."""
    test = module.CounterfactualVATrainingTest("runTest")
    test.runTest()
    process = test.process
    assert process.returncode == 0 and process.modelPath.endswith("model.safetensors")
    assert [p[1:3] for p in test.progress] == [(1, 3), (2, 3), (3, 3)]
    assert test.progress[-1][0] == 1.0
    assert "loss_g" in process.values and "val_score" in process.values  # the last step validated
    assert not any(line.startswith("PROGRESS") for line in test.log)  # progress lines are parsed, not logged
    assert test.log[0].startswith("Running: ") and "--crop image --intensity minmax" in test.log[0]
    table, chart = process.tableNode, process.chartNode
    assert table.GetName() == "tinyrun training log" and chart.GetName() == "tinyrun training losses"
    columns = table_columns(table)
    losses = [c for c in columns if c.startswith("loss")]
    assert columns[0] == "step" and {"loss_g", "loss_cycle", "loss_d_a", "loss_d_n", "lr", "val_ncc"} <= set(columns)
    np.testing.assert_array_equal(slicer.util.arrayFromTableColumn(table, "step"), [1, 2, 3])
    assert np.isfinite(slicer.util.arrayFromTableColumn(table, "loss_g")).all()
    val = slicer.util.arrayFromTableColumn(table, "val_ncc")
    assert np.isnan(val[:2]).all() and np.isfinite(val[2])  # validated at the last step only
    series = chart_series(chart)
    assert [s.GetYColumnName() for s in series] == losses
    assert all(s.GetXColumnName() == "step" and s.GetTableNodeID() == table.GetID() for s in series)
    assert series[0].GetName() == "tinyrun loss_g" and series[0].GetColor() != series[1].GetColor()
    assert process.tableNode.GetScene() is test.scene


def test_stop_writes_a_checkpoint_and_resume_finishes(cohort, tmp_path, scene, model_registry):
    import torch

    logic = CounterfactualVATrainingLogic(scene=scene)
    # Like Slicer's PythonSlicer launcher: starts the real Python as a child (which writes straight into the
    # pipes) and dies of SIGTERM itself, so the exit code seen is the launcher's, not the training's 3.
    logic.pythonExecutable = fake_python(tmp_path, "PythonSlicer", f"sys.exit(subprocess.call([{sys.executable!r}, *sys.argv[1:]]))")
    out = tmp_path / "longrun"
    progress, log = [], []
    process = logic.train(
        cohort, out, **GRID_2D, steps=500, logEvery=1, valEvery=500, checkpointEvery=500, waitForCompletion=False,
        progressCallback=lambda *a: progress.append(a), logCallback=log.append, timeBudget=30,  # minutes: never reached
    )
    deadline = time.monotonic() + 240
    while process.step < 1:
        assert not process.poll(), "\n".join(log)
        assert time.monotonic() < deadline, "\n".join(log)
        time.sleep(0.05)
    assert process.running
    assert process.stop() == 3, "\n".join(log)
    assert process.runner._proc.returncode == -15  # the launcher died of the signal; its child checkpointed and exited 3
    stopped_at = process.step
    assert process.stopped and process.resumable and process.modelPath is None and process.poll() is True
    assert any("--resume" in line for line in log)  # the command line says how to continue
    checkpoint = torch.load(out / "checkpoint.pt", map_location="cpu", weights_only=True)
    assert int(checkpoint["step"]) == stopped_at
    assert not (out / "model.safetensors").exists()
    table, chart = process.tableNode, process.chartNode
    assert table.GetNumberOfRows() == stopped_at
    n_series = chart.GetNumberOfPlotSeriesNodes()
    assert n_series >= 6

    # Resume from the saved request with a shorter schedule; blocking this time, without a launcher.
    logic.pythonExecutable = None
    model = logic.resume(out, steps=stopped_at + 2, logCallback=log.append)
    assert model == str(out / "model.safetensors") and Path(model).is_file()
    assert logic.logNodes(out) == (table, chart)  # the same nodes, continued
    assert table.GetNumberOfRows() == stopped_at + 2
    np.testing.assert_array_equal(slicer.util.arrayFromTableColumn(table, "step"), np.arange(1, stopped_at + 3))
    assert chart.GetNumberOfPlotSeriesNodes() == n_series  # no duplicate series
    assert scene.GetNumberOfNodesByClass("vtkMRMLTableNode") == 1
    assert table.GetAttribute(module.MODEL_PATH_ATTRIBUTE) == model
    # recorded where the CounterfactualVA module can find it
    assert module.trainedModelsFile() == str(model_registry)
    entry = module.trainedModels()[-1]
    assert entry["path"] == model and entry["method"] == "vantgan" and entry["run"] == str(out) and entry["steps"] == stopped_at + 2
    from CounterfactualVALib.checkpoint import read_metadata

    metadata = read_metadata(model)
    assert metadata.preprocessing["size"] == [32, 32] and metadata.preprocessing["intensity"] == "minmax"
    assert metadata.method_config["ngf"] == 8 and metadata.training["steps"] == stopped_at + 2

    # a finished run is not silently overwritten; overwrite=True starts again and clears the log nodes
    with pytest.raises(ValueError, match="already holds a training run"):
        logic.train(cohort, out, **GRID_2D, steps=1)
    request = json.loads((out / "CounterfactualVATraining.json").read_text())
    assert request["arguments"]["config"] == TINY and request["command"][-1] == "--progress"
    assert request["arguments"]["timeBudget"] == 30 and request["command"][request["command"].index("--time-budget") + 1] == "30.0"


def fake_python(tmp_path, name, body):
    """An executable that stands in for the Python the logic launches."""
    path = tmp_path / name
    path.write_text(f"#!{sys.executable}\nimport os, signal, subprocess, sys, time\n{body}\n")
    path.chmod(0o755)
    return str(path)


def test_a_failing_run_raises_the_command_lines_message(cohort, tmp_path, scene):
    logic = CounterfactualVATrainingLogic(scene=scene)
    logic.pythonExecutable = fake_python(tmp_path, "fails", (
        "print('PROGRESS 0.500 step 1/2 loss_g=1.5', flush=True)\n"
        "print('Traceback: details', file=sys.stderr)\n"
        "print('ERROR: --device cuda was requested but PyTorch sees no CUDA GPU. Use --device cpu or auto.', file=sys.stderr)\n"
        "sys.exit(2)"
    ))
    progress, log = [], []
    with pytest.raises(RuntimeError, match=r"^--device cuda was requested but PyTorch sees no CUDA GPU. Use --device cpu or auto.$"):
        logic.train(cohort, tmp_path / "run1", **GRID_2D, steps=2, progressCallback=lambda *a: progress.append(a), logCallback=log.append)
    assert progress == [(0.5, 1, 2, {"loss_g": 1.5})] and "Traceback: details" in log
    assert module.trainedModels() == []

    logic.pythonExecutable = fake_python(tmp_path, "killed", "os.kill(os.getpid(), signal.SIGKILL)")
    process = logic.train(cohort, tmp_path / "run2", **GRID_2D, steps=2, waitForCompletion=False)
    with pytest.raises(RuntimeError, match="killed by signal 9 .*out of memory"):
        process.wait(timeout=60)
    with pytest.raises(RuntimeError, match="killed by signal 9"):
        process.poll()  # stays failed

    logic.pythonExecutable = fake_python(tmp_path, "noisy", "print('boom', file=sys.stderr); sys.exit(1)")
    with pytest.raises(RuntimeError, match="failed with exit code 1: boom"):
        logic.train(cohort, tmp_path / "run3", **GRID_2D, steps=2)
    logic.pythonExecutable = fake_python(tmp_path, "nomodel", "sys.exit(0)")
    with pytest.raises(RuntimeError, match="ended without writing .*model.safetensors"):
        logic.train(cohort, tmp_path / "run4", **GRID_2D, steps=2)


def test_stop_before_the_first_step_leaves_nothing_to_resume(cohort, tmp_path, scene):
    """SIGTERM while the process is still starting (imports, data loading): it dies, no checkpoint."""
    logic = CounterfactualVATrainingLogic(scene=scene)
    logic.pythonExecutable = fake_python(tmp_path, "slowstart", "time.sleep(60)")
    log = []
    process = logic.train(cohort, tmp_path / "run", **GRID_2D, steps=2, waitForCompletion=False, logCallback=log.append)
    assert not process.poll()
    started = time.monotonic()
    assert process.stop(timeout=30) == -15
    assert time.monotonic() - started < 20
    assert process.stopped and not process.resumable and process.modelPath is None
    assert "start it again" in log[-1]


def test_recorded_models_list_is_robust(tmp_path, model_registry):
    assert module.trainedModels() == []
    model_registry.parent.mkdir(parents=True)
    model_registry.write_text("{not json")
    assert module.trainedModels() == []
    a, b = tmp_path / "a.safetensors", tmp_path / "b.safetensors"
    a.write_bytes(b"x")
    b.write_bytes(b"x")
    module.recordTrainedModel(a, method="vantgan")
    module.recordTrainedModel(b, method="vagan")
    module.recordTrainedModel(a, method="vantgan")  # again: moves to the end, no duplicate
    assert [Path(e["path"]).name for e in module.trainedModels()] == ["b.safetensors", "a.safetensors"]
    b.unlink()
    assert [Path(e["path"]).name for e in module.trainedModels()] == ["a.safetensors"]
    assert len(module.trainedModels(existingOnly=False)) == 2


# --- the panel's .ui file ---------------------------------------------------------------------------------

UI_FILE = MODULE_DIR / "Resources" / "UI" / "CounterfactualVATraining.ui"
CONTAINERS = {"qMRMLWidget", "QWidget", "ctkCollapsibleButton", "QGroupBox", "QFrame"}


def test_ui_widgets_and_module_code_agree():
    tree = ET.parse(UI_FILE)
    widgets = {w.get("name"): w.get("class") for w in tree.iter("widget")}
    source = (MODULE_DIR / "CounterfactualVATraining.py").read_text()
    referenced = set(re.findall(r"self\.ui\.(\w+)", source))
    assert referenced, "the module references no widgets"
    missing = referenced - set(widgets)
    assert not missing, f"module code uses widgets that the .ui lacks: {sorted(missing)}"
    interactive = {name for name, cls in widgets.items() if cls not in CONTAINERS and cls != "QLabel"}
    unused = interactive - referenced
    assert not unused, f".ui widgets that the module never uses: {sorted(unused)}"
    assert {"startButton", "stopButton", "resumeButton", "progressBar", "logTextEdit", "lossesLabel"} <= referenced
    # the parameter-node bindings name exactly the parameters of the wrapper class
    bound = {}
    for widget in tree.iter("widget"):
        for prop in widget.findall("property"):
            if prop.get("name") == "SlicerParameterName":
                bound[widget.get("name")] = prop.find("string").text
    (parameter_class,) = [n for n in ast.walk(ast.parse(source)) if isinstance(n, ast.ClassDef) and n.name == "CounterfactualVATrainingParameterNode"]
    declarations = {n.target.id: ast.unparse(n.annotation) for n in parameter_class.body if isinstance(n, ast.AnnAssign)}
    assert set(bound.values()) == set(declarations)
    assert len(bound) == len(set(bound.values()))
    # the widget kinds the parameter node wrapper can connect to each parameter's type: paths and multi-line
    # text are str through slicer_support.framework's connectors (Slicer's own turn "" into "." and reverse
    # typed text); a QTextEdit would get Slicer's unguarded connector, so none may be bound
    kinds = {
        "ctkPathLineEdit": r"^str$", "QComboBox": r"Choice\(", "QLineEdit": r"^str$", "QPlainTextEdit": r"^str$", "QSpinBox": r"^Annotated\[int, WithinRange",
        "QDoubleSpinBox": r"^Annotated\[float, WithinRange",
    }
    assert "QTextEdit" not in {widgets[name] for name in bound}
    for name, parameter in bound.items():
        assert re.search(kinds[widgets[name]], declarations[parameter]), (name, declarations[parameter])
    declared = {c.find("class").text for c in tree.iter("customwidget")}
    assert {cls for cls in widgets.values() if cls.startswith(("ctk", "qMRML"))} <= declared


def test_resources_exist():
    icon = MODULE_DIR / "Resources" / "Icons" / "CounterfactualVATraining.png"
    image = sitk.ReadImage(str(icon))
    assert image.GetSize() == (128, 128) and image.GetNumberOfComponentsPerPixel() in (3, 4)
    cmake = (MODULE_DIR / "CMakeLists.txt").read_text()
    assert "slicerMacroBuildScriptedModule" in cmake and "Resources/UI/*.ui" in cmake and "Resources/Icons/*.png" in cmake
