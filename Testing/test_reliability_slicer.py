"""The Slicer logic on slicer-core's real MRML scene (issue 12): a run that fails (bad input refused by the
command line, or a failure while its results are being loaded) or is cancelled leaves the scene exactly as
it was (same nodes, same input voxels, same views) and no temporary folder."""

from __future__ import annotations

import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pytest

slicer = pytest.importorskip("slicer")
if not hasattr(slicer, "vtkMRMLScene"):
    pytest.skip("slicer-core (MRML) is not installed", allow_module_level=True)

MODULE_DIR = Path(__file__).resolve().parents[1] / "CounterfactualVA"
if str(MODULE_DIR) not in sys.path:
    sys.path.insert(0, str(MODULE_DIR))

import CounterfactualVA as module  # noqa: E402
from CounterfactualVA import CounterfactualVALogic, makeScene  # noqa: E402
from CounterfactualVALib import slicer_nodes  # noqa: E402


@pytest.fixture
def scene():
    scene = makeScene()
    yield scene
    scene.Clear(1)


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    pytest.importorskip("torch")
    return module.CounterfactualVATest.makeTinyModel(tmp_path_factory.mktemp("model") / "tiny3d.safetensors")


def volume(scene, name="T1", nan=False):
    node = module.CounterfactualVATest.makeObliqueVolume(scene, name=name, shape=(12, 14, 16))
    if nan:
        array = slicer.util.arrayFromVolume(node).astype(np.float32)
        array[2, 3, 4] = np.nan
        slicer.util.updateVolumeFromArray(node, array)
    return node


def scene_state(scene) -> list:
    """Every node's id, class and name, and what the slice views show."""
    state = []
    for i in range(scene.GetNumberOfNodes()):
        node = scene.GetNthNode(i)
        state.append((node.GetID(), node.GetClassName(), node.GetName()))
        if node.IsA("vtkMRMLSliceCompositeNode"):
            state.append((node.GetID(), node.GetBackgroundVolumeID(), node.GetForegroundVolumeID(), node.GetLabelVolumeID()))
    return state


def temporary_folders() -> set:
    return {p for p in os.listdir(tempfile.gettempdir()) if p.startswith("CounterfactualVA-")}


def test_command_line_refusal_arrives_as_its_error_line_and_changes_nothing(scene, tiny_model):
    node = volume(scene, nan=True)
    before, inputs, folders = scene_state(scene), slicer_nodes.node_state(node), temporary_folders()
    with pytest.raises((RuntimeError, ValueError), match="NaN/Inf voxels") as info:
        CounterfactualVALogic().run(node, tiny_model, device="cpu")
    assert "—" in str(info.value)  # what — fix, as the command line's last line says it
    assert scene_state(scene) == before and slicer_nodes.node_state(node) == inputs
    assert temporary_folders() == folders


def test_failure_while_loading_results_removes_every_node_it_made(scene, tiny_model, monkeypatch):
    """The outputs load node by node; the segmentation comes last. If it fails, the volumes already added
    must go again: no half-made result stays in the scene."""
    node = volume(scene)
    before, inputs, folders = scene_state(scene), slicer_nodes.node_state(node), temporary_folders()

    def broken(*args, **kwargs):
        raise RuntimeError("segmentation module unavailable")

    monkeypatch.setattr(slicer_nodes, "segmentation_from_labelmap", broken)
    with pytest.raises(RuntimeError, match="segmentation module unavailable"):
        CounterfactualVALogic().run(node, tiny_model, device="cpu", createSegmentation=True)
    assert scene_state(scene) == before and slicer_nodes.node_state(node) == inputs
    assert temporary_folders() == folders


@pytest.mark.parametrize("stage", ["Reading input", "Running"])
def test_cancel_at_any_stage_leaves_the_scene_as_it_was(scene, tiny_model, stage):
    node = volume(scene)
    before, inputs, folders = scene_state(scene), slicer_nodes.node_state(node), temporary_folders()
    stages = []
    process = CounterfactualVALogic().run(node, tiny_model, device="cpu", waitForCompletion=False, progressCallback=lambda f, s: stages.append(s))
    deadline = time.monotonic() + 120
    while not any(s.startswith(stage) for s in stages) and time.monotonic() < deadline:
        if process.poll():
            break
        time.sleep(0.01)
    process.cancel()
    assert process.poll() is True and process.result is None
    assert scene_state(scene) == before and slicer_nodes.node_state(node) == inputs
    assert temporary_folders() == folders
