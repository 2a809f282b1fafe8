"""The Slicer module's logic against slicer-core's real MRML scene (no Qt, no application).

Geometry round trips through the NRRD writer/loader, loading of output folders into new nodes (fixture
folders written with SimpleITK, exactly as the command line writes them), the subprocess end to end with
the real command line and a random-weight model, cancel, failures, bad inputs, and the .ui file.
"""

from __future__ import annotations

import os
import re
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

slicer = pytest.importorskip("slicer")
if not hasattr(slicer, "vtkMRMLScene"):
    pytest.skip("slicer-core (MRML) is not installed", allow_module_level=True)
import vtk  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
MODULE_DIR = REPO / "CounterfactualVA"
if str(MODULE_DIR) not in sys.path:
    sys.path.insert(0, str(MODULE_DIR))

import CounterfactualVA as module  # noqa: E402
from CounterfactualVA import CounterfactualVALogic, makeScene  # noqa: E402
from CounterfactualVALib import slicer_nodes  # noqa: E402
from CounterfactualVALib.run_summary import OutputFiles, RunSummary, Thresholds  # noqa: E402



def self_test_class():
    """The module's ScriptedLoadableModuleTest (not bound at module level, where pytest would collect it)."""
    return module.CounterfactualVATest


# --- fixtures -------------------------------------------------------------------------------------------


@pytest.fixture
def scene():
    scene = makeScene()
    yield scene
    scene.Clear(1)


def oblique_volume(scene, name="T1", shape=(12, 14, 16), dtype=np.int16):
    """Anisotropic spacing, oblique axes, non-zero origin, a bright off-centre blob; int16 voxels like most
    MRI files (the self-test's own volume is float32)."""
    node = self_test_class().makeObliqueVolume(scene, name=name, shape=shape)
    if dtype != np.float32:
        slicer.util.updateVolumeFromArray(node, slicer.util.arrayFromVolume(node).astype(dtype))  # keeps the geometry
    return node


def linear_transform(scene, name="Registration"):
    transform = vtk.vtkTransform()
    transform.PostMultiply()
    transform.RotateY(11)
    transform.RotateX(-7)
    transform.Translate(4.5, -3.25, 9.0)
    node = scene.AddNewNodeByClass("vtkMRMLLinearTransformNode", name)
    node.SetMatrixTransformToParent(transform.GetMatrix())
    return node


def node_count(scene):
    return scene.GetNumberOfNodes()


def world_matrix(node):
    return slicer_nodes.world_ijk_to_ras(node)


def assert_same_grid(node, reference):
    assert slicer_nodes.matrices_equal(slicer_nodes.ijk_to_ras(node), slicer_nodes.ijk_to_ras(reference), 1e-12)
    assert node.GetTransformNodeID() == reference.GetTransformNodeID()
    assert node.GetImageData().GetDimensions() == reference.GetImageData().GetDimensions()
    assert np.allclose(world_matrix(node), world_matrix(reference), atol=1e-12)


def assert_unchanged(node, before):
    after = slicer_nodes.node_state(node)
    assert after == before


def write_fixture_outputs(input_node, out_dir: Path, counterfactual=True, extras=True, shift_origin=0.0, stem="T1"):
    """An output folder as `counterfactualva attribute` writes it: images on the input's grid (in the input
    file's own geometry, one-slice inputs of a 2D model included) + summary.json."""
    out_dir.mkdir(parents=True, exist_ok=True)
    reference = sitk.ReadImage(slicer_nodes.write_volume(input_node, out_dir / "reference.nrrd"))
    os.remove(out_dir / "reference.nrrd")
    if shift_origin:
        reference.SetOrigin([o + shift_origin for o in reference.GetOrigin()])
    image = sitk.GetArrayFromImage(reference).astype(np.float32)
    rng = np.random.default_rng(1)
    attribution = (rng.normal(0, 5, image.shape) + np.where(image > 120, -40.0, 0.0)).astype(np.float32)
    attribution.flat[0] = 55.0  # the largest magnitude is positive
    mask = (np.abs(attribution) >= 0.5 * np.abs(attribution).max()).astype(np.uint8)

    def write(array, name):
        out = sitk.GetImageFromArray(array)
        out.CopyInformation(reference)
        sitk.WriteImage(out, str(out_dir / name), True)
        return name

    outputs = OutputFiles(
        counterfactual=write(image + attribution, f"{stem}_counterfactual.nrrd") if counterfactual else None,
        attribution=write(attribution, f"{stem}_attribution.nrrd"),
        mask=write(mask, f"{stem}_mask.nrrd"),
    )
    if extras:
        outputs = replace(
            outputs,
            extras={
                "attention": write(rng.uniform(0, 1, image.shape).astype(np.float32), f"{stem}_attention.nrrd"),
                "icam_std": write(np.abs(attribution) / 10, f"{stem}_icam_std.nrrd"),
            },
            extra_kinds={"attention": "probability", "icam_std": "difference"},
        )
    summary = fixture_summary(
        outputs, Thresholds(rule="paper", value=None, applied_to_abs_map=float(0.5 * np.abs(attribution).max())),
        description="VANT-GAN counterfactual attribution (fixture).", scalars={"class_probability": 0.93},
    )
    summary.write(out_dir)
    return summary, attribution, mask


def fixture_summary(outputs: OutputFiles, thresholds: Thresholds, description: str, scalars: dict | None = None) -> RunSummary:
    """The summary a run with these outputs writes (the figures a fixture does not need are neutral)."""
    return RunSummary(
        package_version="fixture", method="vantgan", method_title="VANT-GAN", description=description,
        map_sign="counterfactual minus input", input="fixture", model="fixture", classes=["normal", "abnormal"],
        normal_class=0, outputs=outputs, thresholds=thresholds, mask_voxels=0, mask_volume_ml=None,
        attribution_range=[0.0, 0.0], device="cpu", timings_s={"total": 0.1}, preprocess_state={}, scalars=scalars or {},
    )


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory):
    pytest.importorskip("torch")
    return self_test_class().makeTinyModel(tmp_path_factory.mktemp("model") / "tiny3d.safetensors")


# --- the module file under slicer-core --------------------------------------------------------------------


def test_module_imports_under_slicer_core_without_qt():
    assert module.HAVE_SLICER_APP is False
    assert CounterfactualVALogic.__mro__[1] is object  # no stand-in base class for the logic
    assert module.CounterfactualVAParameterNode is None
    with pytest.raises(RuntimeError, match="needs the 3D Slicer application"):
        module.CounterfactualVAWidget().setup()
    logic = CounterfactualVALogic()
    with pytest.raises(RuntimeError, match="Parameter nodes need"):
        logic.getParameterNode()


def test_threshold_rules_and_devices_match_the_command_line():
    from CounterfactualVACLI.cli import build_parser

    parser = build_parser()
    attribute = parser._subparsers._group_actions[0].choices["attribute"]
    choices = {action.dest: tuple(action.choices) for action in attribute._actions if action.choices}
    assert choices["threshold_rule"] == module.THRESHOLD_RULES
    assert choices["device"] == module.DEVICES


def test_command_and_child_environment():
    logic = CounterfactualVALogic()
    command = logic.buildCommand("/m/model.safetensors", "/t/in.nrrd", "/t/out", "cpu", "percentile", 99)
    assert command[0] == sys.executable
    assert command[1:4] == ["-m", "CounterfactualVACLI", "attribute"]
    assert command[command.index("--threshold-value") + 1] == "99.0"
    assert command[-1] == "--progress"
    assert "--threshold-value" not in logic.buildCommand("m", "i", "o")
    env = logic.childEnvironment("cpu")
    assert env["PYTHONPATH"].split(os.pathsep)[0] == str(MODULE_DIR)
    assert env["CUDA_VISIBLE_DEVICES"] == "-1"
    assert env["PYTHONUNBUFFERED"] == "1"
    assert logic.childEnvironment("auto").get("CUDA_VISIBLE_DEVICES") == os.environ.get("CUDA_VISIBLE_DEVICES")


def test_model_info_reads_the_metadata_only(tiny_model, tmp_path):
    logic = CounterfactualVALogic()
    info = logic.modelInfo(tiny_model)
    assert "vantgan (3D)" in info and "[16, 16, 16]" in info and "normal: normal" in info
    assert logic.modelInfo(tmp_path / "missing.safetensors").startswith("Model file not found")
    (tmp_path / "text.safetensors").write_text("hello")
    assert logic.modelInfo(tmp_path / "text.safetensors").startswith("Not usable:")
    assert logic.modelInfo("") == "No model selected."


def test_progress_lines_are_parsed():
    from CounterfactualVALib.slicer_support.process import parse_progress

    assert parse_progress("PROGRESS 0.300 Running VANT-GAN on CPU") == (0.3, "Running VANT-GAN on CPU")
    assert parse_progress("PROGRESS 1.5 x") == (1.0, "x")
    assert parse_progress("Wrote files") is None
    assert parse_progress("PROGRESS abc") is None


# --- geometry: write and read back ------------------------------------------------------------------------


def test_oblique_volume_round_trips_through_nrrd(scene, tmp_path):
    node = oblique_volume(scene)
    matrix = slicer_nodes.ijk_to_ras(node)
    assert not np.allclose(matrix[:3, :3], np.diag(np.diag(matrix[:3, :3])))  # really oblique
    assert len({round(s, 6) for s in node.GetSpacing()}) == 3 and np.any(matrix[:3, 3] != 0)
    before = slicer_nodes.node_state(node)
    path = slicer_nodes.write_volume(node, tmp_path / "in.nrrd")
    assert_unchanged(node, before)
    loaded = slicer_nodes.read_volume(path)
    assert slicer_nodes.matrices_equal(slicer_nodes.ijk_to_ras(loaded), matrix, 1e-9)
    np.testing.assert_array_equal(slicer.util.arrayFromVolume(loaded), slicer.util.arrayFromVolume(node))
    # ITK sees the same physical grid in LPS
    image = sitk.ReadImage(path)
    ras_origin = matrix[:3, 3]
    np.testing.assert_allclose(image.GetOrigin(), [-ras_origin[0], -ras_origin[1], ras_origin[2]], atol=1e-9)
    np.testing.assert_allclose(image.GetSpacing(), node.GetSpacing(), atol=1e-9)


def test_volume_under_linear_transform_round_trips_with_the_transform_hardened(scene, tmp_path):
    node = oblique_volume(scene)
    transform = linear_transform(scene)
    node.SetAndObserveTransformNodeID(transform.GetID())
    to_world = vtk.vtkMatrix4x4()
    transform.GetMatrixTransformToWorld(to_world)
    expected_world = slicer.util.arrayFromVTKMatrix(to_world) @ slicer_nodes.ijk_to_ras(node)
    before = slicer_nodes.node_state(node)
    path = slicer_nodes.write_volume(node, tmp_path / "in.nrrd")
    assert_unchanged(node, before)
    loaded = slicer_nodes.read_volume(path)
    assert slicer_nodes.matrices_equal(slicer_nodes.ijk_to_ras(loaded), expected_world, 1e-9)
    np.testing.assert_array_equal(slicer.util.arrayFromVolume(loaded), slicer.util.arrayFromVolume(node))
    # Output files come back with the input's own matrix and parent transform
    output = slicer_nodes.read_output_like(path, node)
    slicer_nodes.add_to_scene_like(output, node, "copy")
    assert_same_grid(output, node)
    assert slicer_nodes.same_world_geometry(output, node)


def test_output_on_another_grid_is_refused(scene, tmp_path):
    node = oblique_volume(scene)
    write_fixture_outputs(node, tmp_path, shift_origin=0.5)
    count = node_count(scene)
    with pytest.raises(RuntimeError, match="not on the input's voxel grid"):
        CounterfactualVALogic().loadResults(node, tmp_path)
    assert node_count(scene) == count


# --- loading an output folder -----------------------------------------------------------------------------


def test_fixture_outputs_become_new_nodes_on_the_input_grid(scene, tmp_path):
    node = oblique_volume(scene)
    node.SetAttribute("Custom.Key", "value")
    transform = linear_transform(scene)
    node.SetAndObserveTransformNodeID(transform.GetID())
    sh = scene.GetSubjectHierarchyNode()
    study = sh.CreateStudyItem(sh.CreateSubjectItem(sh.GetSceneItemID(), "Patient"), "Study")
    sh.CreateItem(study, node)
    before = slicer_nodes.node_state(node)
    summary, attribution, mask = write_fixture_outputs(node, tmp_path)

    result = CounterfactualVALogic().loadResults(node, tmp_path, opacity=0.35)

    assert result.counterfactual.GetName() == "T1 counterfactual"
    assert result.attribution.GetName() == "T1 attribution"
    assert result.mask.GetName() == "T1 attribution mask"
    assert set(result.extras) == {"attention", "icam_std"}
    assert result.extras["attention"].GetName() == "T1 attention"
    assert result["summary"].scalars["class_probability"] == 0.93
    assert result.segmentation is None
    from CounterfactualVALib.slicer_support.results import finished_lines

    lines = finished_lines(result)  # what the panel logs when the run ends
    assert "class_probability: 0.93" in lines and lines[-1].startswith("Created: T1 counterfactual, T1 attribution, T1 attribution mask")
    for new in result.nodes():
        assert_same_grid(new, node)
        assert new.GetAttribute(slicer_nodes.DESCRIPTION_ATTRIBUTE)
        assert new.GetDescription() == new.GetAttribute(slicer_nodes.DESCRIPTION_ATTRIBUTE)
        assert new.GetAttribute(slicer_nodes.INPUT_ATTRIBUTE) == node.GetID()
        assert sh.GetItemParent(sh.GetItemByDataNode(new)) == study
    assert result.mask.IsA("vtkMRMLLabelMapVolumeNode")
    assert set(np.unique(slicer.util.arrayFromVolume(result.mask))) == {0, 1}
    # values survive LPS <-> RAS and the file round trip
    np.testing.assert_allclose(slicer.util.arrayFromVolume(result.attribution), attribution)
    np.testing.assert_array_equal(slicer.util.arrayFromVolume(result.mask), mask)
    # signed map: diverging table, transparent below the mask threshold (half the maximum here), window
    # centred on zero and covering the largest magnitude
    display = result.attribution.GetDisplayNode()
    alphas = [display.GetColorNode().GetLookupTable().GetTableValue(i)[3] for i in range(256)]
    # the mask threshold is half the maximum here; the overlay is drawn from half of that (a quarter of the window)
    assert display.GetColorNode().GetName() == f"{slicer_nodes.DIVERGING_COLOR_NODE_NAME} (transparent below 25%)"
    assert alphas[0] == alphas[96] == alphas[160] == alphas[255] == 1.0  # |v| >= 25 % of the maximum: drawn
    assert alphas[100] == alphas[128] == alphas[156] == 0.0  # below: not drawn
    assert not display.GetAutoWindowLevel()
    assert display.GetLevel() == 0.0
    assert display.GetWindow() == pytest.approx(2 * np.abs(attribution).max(), rel=1e-6)
    assert result.extras["icam_std"].GetDisplayNode().GetLevel() == 0.0
    assert result.extras["attention"].GetDisplayNode().GetWindow() == pytest.approx(1.0)
    assert result.mask.GetDisplayNode().GetColorNode().GetName() == slicer_nodes.MASK_COLOR_NODE_NAME
    assert "threshold rule 'paper'" in result.mask.GetDescription()
    # the counterfactual looks like the input
    assert result.counterfactual.GetDisplayNode().GetWindow() == pytest.approx(node.GetDisplayNode().GetWindow())
    # slice views: scan underneath, map over it with the opacity, mask as label layer
    composites = [scene.GetNthNodeByClass(i, "vtkMRMLSliceCompositeNode") for i in range(scene.GetNumberOfNodesByClass("vtkMRMLSliceCompositeNode"))]
    assert len(composites) == 3
    for composite in composites:
        assert composite.GetBackgroundVolumeID() == node.GetID()
        assert composite.GetForegroundVolumeID() == result.attribution.GetID()
        assert composite.GetLabelVolumeID() == result.mask.GetID()
        assert composite.GetForegroundOpacity() == pytest.approx(0.35)
    assert CounterfactualVALogic.setOpacity(result, 0.8) == 3
    assert composites[0].GetForegroundOpacity() == pytest.approx(0.8)
    assert_unchanged(node, before)
    assert node.GetAttribute("Custom.Key") == "value"


def test_diverging_colour_table_is_symmetric_and_reused(scene, tmp_path):
    node = oblique_volume(scene)
    write_fixture_outputs(node, tmp_path)
    logic = CounterfactualVALogic()
    first = logic.loadResults(node, tmp_path)
    second = logic.loadResults(node, tmp_path)
    tables = [scene.GetNthNodeByClass(i, "vtkMRMLColorTableNode") for i in range(scene.GetNumberOfNodesByClass("vtkMRMLColorTableNode"))]
    assert [t.GetName() for t in tables].count(slicer_nodes.DIVERGING_COLOR_NODE_NAME) == 1
    assert second.attribution.GetName() != first.attribution.GetName()  # a second run gets unique names
    table = slicer_nodes.diverging_color_node(scene)
    n = table.GetNumberOfColors()
    rgba = np.array([table.GetLookupTable().GetTableValue(i) for i in range(n)])
    np.testing.assert_allclose(rgba[:, 0], rgba[::-1, 2], atol=0.35)  # blue end mirrors red end
    assert rgba[0, 2] > rgba[0, 0] and rgba[-1, 0] > rgba[-1, 2]  # negative blue, positive red
    assert rgba[n // 2, :3].min() > 0.95  # white around zero


def test_colour_map_choice_changes_the_attribution_table_and_tables_are_reused_per_palette(scene, tmp_path):
    node = oblique_volume(scene)
    write_fixture_outputs(node, tmp_path)
    logic = CounterfactualVALogic()
    assert module.PALETTES[0] == slicer_nodes.DEFAULT_PALETTE == "blue-red" and "purple-orange" in module.PALETTES
    default = logic.loadResults(node, tmp_path)
    chosen = logic.loadResults(node, tmp_path, palette="purple-orange")
    again = logic.loadResults(node, tmp_path, palette="purple-orange")

    def rgba(result):
        table = result.attribution.GetDisplayNode().GetColorNode()
        return np.array([table.GetLookupTable().GetTableValue(i) for i in range(table.GetNumberOfColors())])

    blue_red, purple_orange = rgba(default), rgba(chosen)
    assert not np.allclose(blue_red[-1, :3], purple_orange[-1, :3])  # extreme positive entry: red vs orange
    assert not np.allclose(blue_red[0, :3], purple_orange[0, :3])
    assert purple_orange[-1, 0] > purple_orange[-1, 2] and purple_orange[0, 2] > purple_orange[0, 1]  # orange / purple
    # the overlay table keeps the transparent centre and the white at zero
    assert purple_orange[100, 3] == purple_orange[128, 3] == purple_orange[156, 3] == 0.0
    assert purple_orange[0, 3] == purple_orange[255, 3] == 1.0
    assert purple_orange[127, :3].min() > 0.95
    table = chosen.attribution.GetDisplayNode().GetColorNode()
    assert "purple-orange" in table.GetName() and "purple-orange" in table.GetAttribute(slicer_nodes.COLOR_ATTRIBUTE)
    assert default.attribution.GetDisplayNode().GetColorNodeID() != table.GetID()
    assert again.attribution.GetDisplayNode().GetColorNodeID() == table.GetID()  # reused per palette
    # extras shown as signed maps follow the palette too; their opaque table is one per palette
    opaque = again.extras["icam_std"].GetDisplayNode().GetColorNode()
    assert opaque.GetName() == f"{slicer_nodes.DIVERGING_COLOR_NODE_NAME} purple-orange"
    assert slicer_nodes.diverging_color_node(scene, palette="purple-orange").GetID() == opaque.GetID()
    assert slicer_nodes.diverging_color_node(scene).GetName() == slicer_nodes.DIVERGING_COLOR_NODE_NAME
    # an unknown palette is refused, naming the choices, and adds nothing
    count = node_count(scene)
    with pytest.raises(ValueError, match="Unknown colour map 'rainbow': use one of blue-red, purple-orange"):
        logic.loadResults(node, tmp_path, palette="rainbow")
    with pytest.raises(ValueError, match="green-magenta"):
        slicer_nodes.show_signed_map(default.attribution, palette="rainbow")
    with pytest.raises(ValueError, match="blue-red"):
        slicer_nodes.signed_overlay_color_node(scene, 0.25, palette="rainbow")
    assert node_count(scene) == count
    assert default.attribution.GetDisplayNode().GetColorNodeID() != table.GetID()


def test_changing_the_palette_recolours_results_already_loaded(scene, tmp_path):
    """The panel's colour-map choice redraws every signed map in the scene, keeping each overlay's cut."""
    node = oblique_volume(scene)
    write_fixture_outputs(node, tmp_path)
    logic = CounterfactualVALogic()
    first, second = logic.loadResults(node, tmp_path), logic.loadResults(node, tmp_path, transparentBelowThreshold=False)
    fresh = logic.loadResults(node, tmp_path, palette="purple-orange")
    redrawn = logic.recolorResults(scene, "purple-orange")
    signed = {n.GetID() for r in (first, second, fresh) for n in [r.attribution, *r.extras.values()] if n.GetAttribute("CounterfactualVA.DisplayKind") == "difference"}
    assert {n.GetID() for n in redrawn} == signed and first.attribution.GetID() in signed
    assert first.attribution.GetDisplayNode().GetColorNodeID() == fresh.attribution.GetDisplayNode().GetColorNodeID()  # same cut, same table
    assert "purple-orange" in second.attribution.GetDisplayNode().GetColorNode().GetName()
    assert second.attribution.GetDisplayNode().GetColorNodeID() != first.attribution.GetDisplayNode().GetColorNodeID()  # no cut: opaque
    assert first.mask.GetID() not in {n.GetID() for n in redrawn} and first.counterfactual.GetID() not in {n.GetID() for n in redrawn}
    with pytest.raises(ValueError, match="Unknown colour map"):
        logic.recolorResults(scene, "rainbow")


def test_device_description_is_asked_of_the_child_python_without_importing_torch_here(monkeypatch):
    """The panel's device line comes from a child process (torch and CUDA stay out of the GUI process)."""
    from CounterfactualVALib.slicer_support import device_probe

    monkeypatch.setattr(device_probe, "_CACHE", {})
    monkeypatch.delitem(sys.modules, "torch", raising=False)
    import builtins

    real_import = builtins.__import__

    def no_torch_here(name, *args, **kwargs):
        if name == "torch" or name.startswith("torch."):
            raise AssertionError("torch imported in the GUI process")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_torch_here)
    assert CounterfactualVALogic().deviceDescription() == "No CUDA GPU detected: runs on the CPU"  # this test machine
    assert len(device_probe._CACHE) == 1  # asked once: a second panel reads the cached answer
    probe = CounterfactualVALogic().deviceProbe()
    assert probe._runner is None and probe.poll() == "No CUDA GPU detected: runs on the CPU"
    monkeypatch.setattr(builtins, "__import__", real_import)
    assert device_probe.describe({"torch": "2.13", "cuda": True, "name": "NVIDIA Test GPU", "memory_gib": 24.0}) == "GPU: NVIDIA Test GPU, 24.0 GiB"
    assert device_probe.describe({"torch": None}) == "PyTorch not installed yet (installed on first Apply)"
    assert device_probe.describe({"torch": "2.13", "cuda": False, "error": "driver too old"}).startswith("No usable CUDA GPU (driver too old)")


def _render_red_view(scene, size=96):
    """The Red slice view's blended RGB image (rows top first) as vtkMRMLSliceLogic computes it for a Slicer
    slice view (benchmarks/render_slice_views.py), and a function mapping a RAS point to its (row, column)."""
    sys.path.insert(0, str(REPO / "benchmarks"))
    try:
        from render_slice_views import slice_image
    finally:
        sys.path.remove(str(REPO / "benchmarks"))
    slice_logic = scene._counterfactualVALogics[3][0]
    slice_node = slice_logic.GetSliceNode()
    slice_node.SetOrientation("Axial")
    slice_node.SetDimensions(size, size, 1)
    slice_logic.FitSliceToAll()
    image = slice_image(slice_logic)[..., :3].astype(int)
    ras_to_xy = vtk.vtkMatrix4x4()
    vtk.vtkMatrix4x4.Invert(slice_node.GetXYToRAS(), ras_to_xy)

    def pixel(ras):
        x, y = slicer.util.arrayFromVTKMatrix(ras_to_xy)[:2] @ [*ras, 1.0]
        return image.shape[0] - 1 - round(float(y)), round(float(x))

    return image, pixel


def _overlay_fixture(scene, tmp_path):
    """A 'scan' with a left-right intensity ramp, and an output folder whose map is weak noise everywhere
    (|map| < 1.5) plus a strong positive blob (+40) and a strong negative blob (-30); mask |map| >= 20."""
    shape = (9, 48, 48)
    i = np.broadcast_to(np.arange(shape[2], dtype=np.float32), shape)
    node = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "T1")
    slicer.util.updateVolumeFromArray(node, (40.0 + 3.0 * i).astype(np.float32))
    node.SetIJKToRASMatrix(slicer.util.vtkMatrixFromArray(np.diag([-2.0, -2.0, 2.0, 1.0])))  # LPS-stored, like ITK files
    node.CreateDefaultDisplayNodes()
    node.GetDisplayNode().SetAndObserveColorNodeID("vtkMRMLColorTableNodeGrey")
    node.GetDisplayNode().AutoWindowLevelOff()
    node.GetDisplayNode().SetWindowLevel(220.0, 110.0)
    attribution = np.random.default_rng(0).uniform(-1.5, 1.5, shape).astype(np.float32)
    attribution[:, 28:40, 28:40] = 40.0
    attribution[:, 6:16, 30:42] = -30.0
    mask = (np.abs(attribution) >= 20.0).astype(np.uint8)
    out = tmp_path / "out"
    out.mkdir()
    reference = sitk.ReadImage(slicer_nodes.write_volume(node, tmp_path / "reference.nrrd"))

    def write(array, name):
        image = sitk.GetImageFromArray(array)
        image.CopyInformation(reference)
        sitk.WriteImage(image, str(out / name))
        return name

    outputs = OutputFiles(attribution=write(attribution, "T1_attribution.nrrd"), mask=write(mask, "T1_mask.nrrd"))
    fixture_summary(outputs, Thresholds(rule="paper", value=None, applied_to_abs_map=20.0), "overlay fixture").write(out)
    to_ras = slicer_nodes.ijk_to_ras(node)

    def ras(kji):
        return (to_ras @ [kji[2], kji[1], kji[0], 1.0])[:3]

    return node, out, ras


@pytest.mark.parametrize("transparent", [True, False])
def test_signed_overlay_colours_only_attribution_above_the_threshold(scene, tmp_path, transparent):
    """Rendered with slicer-core's slice logic (Slicer's own layer blending): with the default
    transparentBelowThreshold the scan shows unchanged where |map| is below the mask threshold and the blobs
    are coloured (red positive, blue negative); without it the whole view is tinted."""
    node, out, ras = _overlay_fixture(scene, tmp_path)
    before = slicer_nodes.node_state(node)
    result = CounterfactualVALogic().loadResults(node, out, opacity=0.6, transparentBelowThreshold=transparent)
    assert_unchanged(node, before)
    composite = scene.GetNthNodeByClass(0, "vtkMRMLSliceCompositeNode")
    composite.SetLabelVolumeID(None)  # judge the foreground overlay alone (the mask label layer is drawn too)
    overlay, pixel = _render_red_view(scene)
    composite.SetForegroundOpacity(0.0)
    scan_only, _ = _render_red_view(scene)

    weak = [pixel(ras(kji)) for kji in ((4, 24, 8), (4, 40, 10), (4, 44, 44), (4, 20, 20))]  # |map| < 1.5
    strong_positive, strong_negative = pixel(ras((4, 34, 34))), pixel(ras((4, 11, 36)))
    for row, column in weak + [strong_positive, strong_negative]:
        grey = scan_only[row, column]
        assert grey[0] == grey[1] == grey[2] and 40 < grey[0] < 230  # the scan itself: grey anatomy
    red, blue = overlay[strong_positive], overlay[strong_negative]
    assert red[0] - red[2] > 40, red  # strong positive attribution: red
    assert blue[2] - blue[0] > 40, blue  # strong negative attribution: blue
    tinted = [np.abs(overlay[p] - scan_only[p]).max() for p in weak]
    if transparent:
        assert tinted == [0, 0, 0, 0]  # anatomy under weak attribution is exactly the scan's grey
        assert result.attribution.GetDisplayNode().GetColorNode().GetName().startswith(slicer_nodes.DIVERGING_COLOR_NODE_NAME)
    else:
        assert min(tinted) > 20  # the old display: white at zero washes the anatomy out
    # the displayed node keeps the method's values (only its colour table differs)
    assert float(slicer.util.arrayFromVolume(result.attribution).max()) == 40.0
    assert abs(float(slicer.util.arrayFromVolume(result.attribution)[4, 24, 8])) < 1.5


def test_overlay_colour_table_draws_every_value_above_the_cut(scene):
    """A ramp from -10 to 10 rendered over grey: everything with |v| >= cut gets the full diverging colour,
    nothing below the cut (less 2 % of the window) is drawn."""
    sys.path.insert(0, str(REPO / "benchmarks"))
    try:
        from render_slice_views import slice_image
    finally:
        sys.path.remove(str(REPO / "benchmarks"))
    n = 400
    background = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "grey")
    slicer.util.updateVolumeFromArray(background, np.full((1, 1, n), 100.0, np.float32))
    background.CreateDefaultDisplayNodes()
    background.GetDisplayNode().AutoWindowLevelOff()
    background.GetDisplayNode().SetWindowLevel(200.0, 100.0)
    values = np.linspace(-10, 10, n).astype(np.float32)  # symmetric: |v| is the same read either way
    ramp = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "ramp")
    slicer.util.updateVolumeFromArray(ramp, values.reshape(1, 1, n))
    ramp.CreateDefaultDisplayNodes()
    ramp.GetDisplayNode().SetInterpolate(0)
    slicer_nodes.show_in_slice_views(scene, background=background, foreground=ramp, foreground_opacity=0.6)
    slice_logic = scene._counterfactualVALogics[3][0]
    slice_logic.GetSliceNode().SetDimensions(n, 1, 1)
    slice_logic.FitSliceToAll()
    composite = slice_logic.GetSliceCompositeNode()
    composite.SetForegroundOpacity(0.0)
    grey = slice_image(slice_logic)[0, :, :3].astype(int)
    composite.SetForegroundOpacity(0.6)
    slicer_nodes.show_signed_map(ramp)
    opaque = slice_image(slice_logic)[0, :, :3].astype(int)
    magnitude = np.abs(values)
    for cut in (0.5, 2.0, 5.0, 9.0):
        assert slicer_nodes.show_signed_map(ramp, transparent_below=cut) == pytest.approx(10.0)
        row = slice_image(slice_logic)[0, :, :3].astype(int)
        unchanged = (row == grey).all(axis=1)
        assert (magnitude[unchanged] < cut).all()
        assert (row[~unchanged] == opaque[~unchanged]).all()  # drawn: the full diverging colour
        assert unchanged[magnitude < cut - 0.02 * 20].all()  # below the cut by 2 % of the window: not drawn
    # tables are made once per band and reused; without a cut the opaque table colours everything
    slicer_nodes.show_signed_map(ramp, transparent_below=2.0)
    first = ramp.GetDisplayNode().GetColorNodeID()
    slicer_nodes.show_signed_map(ramp, transparent_below=2.0)
    assert ramp.GetDisplayNode().GetColorNodeID() == first
    slicer_nodes.show_signed_map(ramp)
    assert ramp.GetDisplayNode().GetColorNode().GetName() == slicer_nodes.DIVERGING_COLOR_NODE_NAME
    row = slice_image(slice_logic)[0, :, :3].astype(int)
    assert not (row == grey).all(axis=1).any()


def test_segmentation_is_made_from_the_mask_when_asked(scene, tmp_path):
    node = oblique_volume(scene)
    node.SetAndObserveTransformNodeID(linear_transform(scene).GetID())
    _, _, mask = write_fixture_outputs(node, tmp_path, extras=False)
    result = CounterfactualVALogic().loadResults(node, tmp_path, createSegmentation=True)
    segmentation = result.segmentation
    assert segmentation.IsA("vtkMRMLSegmentationNode")
    assert segmentation.GetName() == "T1 attribution segmentation"
    assert segmentation.GetTransformNodeID() == node.GetTransformNodeID()
    assert segmentation.GetSegmentation().GetNumberOfSegments() == 1
    segment_id = segmentation.GetSegmentation().GetNthSegmentID(0)
    assert segmentation.GetSegmentation().GetSegment(segment_id).GetName() == slicer_nodes.MASK_SEGMENT_NAME
    exported = scene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode", "exported")
    ids = vtk.vtkStringArray()
    ids.InsertNextValue(segment_id)
    assert slicer.vtkSlicerSegmentationsModuleLogic.ExportSegmentsToLabelmapNode(segmentation, ids, exported, result.mask)
    np.testing.assert_array_equal(slicer.util.arrayFromVolume(exported) > 0, mask > 0)
    assert segmentation.GetAttribute(slicer_nodes.DESCRIPTION_ATTRIBUTE)


def test_single_oblique_slice_through_a_2d_model_comes_back_on_the_slice(scene, tmp_path):
    """A one-slice volume (a 2D model's input) written as the module writes it, attributed by the command
    line's pipeline (in this process, to save a child's start-up) and loaded: every output lands on the slice."""
    from CounterfactualVALib.inference import run_attribution

    model = self_test_class().makeTinyModel(tmp_path / "tiny2d.safetensors", spatialDims=2)
    node = oblique_volume(scene, name="slice", shape=(1, 14, 16))
    before = slicer_nodes.node_state(node)
    scan = slicer_nodes.write_volume(node, tmp_path / "slice.nrrd")
    run_attribution(model, scan, tmp_path / "out", device="cpu", figure=False)
    result = CounterfactualVALogic().loadResults(node, tmp_path / "out")
    assert [n.GetName() for n in result.nodes()] == ["slice counterfactual", "slice attribution", "slice attribution mask"]
    for new in result.nodes():
        assert_same_grid(new, node)
    difference = slicer.util.arrayFromVolume(result.counterfactual) - slicer.util.arrayFromVolume(node)
    np.testing.assert_allclose(slicer.util.arrayFromVolume(result.attribution), difference, atol=1e-3)
    assert_unchanged(node, before)


def test_output_that_lost_the_slice_geometry_is_refused(scene, tmp_path):
    """A 2D image for a one-slice input has lost the slice's position and normal: not on the input's grid."""
    node = oblique_volume(scene, name="slice", shape=(1, 14, 16))
    summary, attribution, _ = write_fixture_outputs(node, tmp_path, extras=False, stem="slice")
    sitk.WriteImage(sitk.GetImageFromArray(attribution[0]), str(tmp_path / summary.outputs.attribution))
    count = node_count(scene)
    with pytest.raises(RuntimeError, match="not on the input's voxel grid"):
        CounterfactualVALogic().loadResults(node, tmp_path)
    assert node_count(scene) == count
    write_fixture_outputs(node, tmp_path, extras=False, stem="slice")
    assert all(slicer_nodes.same_world_geometry(new, node) for new in CounterfactualVALogic().loadResults(node, tmp_path).nodes())


def test_classifier_baseline_without_counterfactual(scene, tmp_path):
    node = oblique_volume(scene)
    write_fixture_outputs(node, tmp_path, counterfactual=False, extras=False)
    result = CounterfactualVALogic().loadResults(node, tmp_path)
    assert result.counterfactual is None
    assert [n.GetName() for n in result.nodes()] == ["T1 attribution", "T1 attribution mask"]


def test_incomplete_output_folder_adds_nothing(scene, tmp_path):
    node = oblique_volume(scene)
    summary, _, _ = write_fixture_outputs(node, tmp_path)
    os.remove(tmp_path / summary.outputs.extras["icam_std"])  # the last file to be read is missing
    count = node_count(scene)
    with pytest.raises(RuntimeError, match="missing or damaged"):
        CounterfactualVALogic().loadResults(node, tmp_path)
    assert node_count(scene) == count
    os.remove(tmp_path / "summary.json")
    with pytest.raises(RuntimeError, match="without a summary"):
        CounterfactualVALogic().loadResults(node, tmp_path)


# --- bad inputs are refused before anything is launched ---------------------------------------------------


def test_bad_inputs_raise_clear_errors(scene, tmp_path):
    logic = CounterfactualVALogic()
    tiny_model = str(tmp_path / "model.safetensors")
    Path(tiny_model).write_bytes(b"validated only for existence before launching")
    good = oblique_volume(scene)
    label = scene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode", "labels")
    slicer.util.updateVolumeFromArray(label, np.zeros((4, 5, 6), np.uint8))
    vector = scene.AddNewNodeByClass("vtkMRMLVectorVolumeNode", "rgb")
    slicer.util.updateVolumeFromArray(vector, np.zeros((4, 5, 6, 3), np.uint8))
    empty = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "empty")
    grid = scene.AddNewNodeByClass("vtkMRMLGridTransformNode", "warp")
    warped = oblique_volume(scene, name="warped")
    warped.SetAndObserveTransformNodeID(grid.GetID())
    model = scene.AddNewNodeByClass("vtkMRMLModelNode", "surface")
    count = node_count(scene)
    folders = temporary_folders()

    cases = [
        (None, tiny_model, {}, "No input volume"),
        (label, tiny_model, {}, "labelmap volume"),
        (vector, tiny_model, {}, "vector"),
        (empty, tiny_model, {}, "has no image data"),
        (model, tiny_model, {}, "not a volume"),
        (warped, tiny_model, {}, "non-linear transform"),
        (good, "", {}, "No model file"),
        (good, str(tmp_path / "missing.safetensors"), {}, "Model file not found"),
        (good, str(tmp_path), {}, "is a folder"),
        (good, tiny_model, {"device": "tpu"}, "Unknown device"),
        (good, tiny_model, {"thresholdRule": "otsu"}, "Unknown threshold rule"),
        (good, tiny_model, {"thresholdValue": -1}, "non-negative"),
    ]
    for node, model_path, options, message in cases:
        with pytest.raises(ValueError, match=message):
            logic.run(node, model_path, **options)
    assert node_count(scene) == count
    assert temporary_folders() == folders  # nothing was launched


# --- the subprocess, with the real command line -----------------------------------------------------------


def temporary_folders():
    return {p for p in os.listdir(tempfile.gettempdir()) if p.startswith("CounterfactualVA-")}


def test_failure_of_the_command_line_raises_its_message_and_creates_nothing(scene, tmp_path):
    node = oblique_volume(scene)
    bad_model = tmp_path / "notes.safetensors"
    bad_model.write_text("this is not a model file")
    count, folders = node_count(scene), temporary_folders()
    with pytest.raises(RuntimeError, match="not a safetensors model file"):
        CounterfactualVALogic().run(node, str(bad_model), device="cpu")  # blocking
    assert node_count(scene) == count
    assert temporary_folders() == folders


def test_cancel_kills_the_process_and_creates_nothing(scene, tiny_model):
    node = oblique_volume(scene)
    count = node_count(scene)
    stages = []
    process = CounterfactualVALogic().run(node, tiny_model, device="cpu", waitForCompletion=False, progressCallback=lambda f, s: stages.append(s))
    assert process.poll() is False and process.running  # the worker is still importing torch
    process.cancel()
    assert not process.running
    assert process.poll() is True and process.result is None
    assert node_count(scene) == count
    assert not os.path.exists(process.tempDir)


@pytest.mark.parametrize("use_worker", [True, False], ids=["warm worker", "fresh process"])
def test_cuda_request_without_a_gpu_falls_back_to_the_cpu(scene, tiny_model, use_worker):
    torch = pytest.importorskip("torch")
    if torch.cuda.is_available():
        pytest.skip("a CUDA GPU is available here: nothing to fall back from")
    node = oblique_volume(scene)
    count, log = node_count(scene), []
    logic = CounterfactualVALogic()
    logic.useWorker = use_worker
    process = logic.run(node, tiny_model, device="cuda", waitForCompletion=False, logCallback=log.append)
    deadline = time.monotonic() + 90
    while not any("running on the CPU instead" in line for line in log):
        assert time.monotonic() < deadline, "\n".join(log)
        assert process.poll() is False
        time.sleep(0.05)
    assert "CUDA was requested" in next(line for line in log if "running on the CPU instead" in line)
    assert process.device == "cpu" and process.running
    if use_worker:
        assert process.request["device"] == "cpu"  # sent again to the same worker
    else:
        assert process.command[process.command.index("--device") + 1] == "cpu"
        assert process.env["CUDA_VISIBLE_DEVICES"] == "-1"
    process.cancel()  # the CPU run itself is what the end-to-end test checks
    assert node_count(scene) == count and not os.path.exists(process.tempDir)
    logic.releaseWorker()


def test_runs_share_one_warm_worker_until_cancel_or_release(scene, tiny_model):
    """Apply twice: one worker process answers both and loads the model once; Cancel ends it, the next run
    starts a fresh one; releasing it (module exit) ends the process."""
    node = oblique_volume(scene)
    logic = CounterfactualVALogic()
    first = logic.run(node, tiny_model, device="cpu", waitForCompletion=False)
    first.wait(timeout=300)
    pid = logic.attributionWorker().pid
    second = logic.run(node, tiny_model, device="cpu", waitForCompletion=False, palette="purple-orange")
    result = second.wait(timeout=300)
    assert logic.attributionWorker().pid == pid
    assert first.modelWasLoaded is True and second.modelWasLoaded is False
    assert result.summary.timings_s["load_model"] == 0.0
    assert_same_grid(result.attribution, node)
    out_files = [p for p in os.listdir(tempfile.gettempdir()) if p.startswith("CounterfactualVA-")]
    assert not any(os.path.exists(p.tempDir) for p in (first, second)), out_files

    third = logic.run(node, tiny_model, device="cpu", waitForCompletion=False)
    third.cancel()
    assert not third.running and third.poll() is True and third.result is None
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)  # killed (and reaped: no zombie keeps the pid)
    fourth = logic.run(node, tiny_model, device="cpu")  # blocking, in a fresh worker
    new_pid = logic.attributionWorker().pid
    assert new_pid != pid and fourth.attribution is not None
    logic.releaseWorker()
    with pytest.raises(ProcessLookupError):
        os.kill(new_pid, 0)


def test_self_test_end_to_end_under_slicer_core(tiny_model, monkeypatch):
    """The module's own self-test (what Slicer's 'Reload and Test' runs): the real command line in a
    subprocess, polled without blocking, on an oblique volume under a linear transform, with a segmentation."""
    test_class = self_test_class()
    monkeypatch.setattr(test_class, "makeTinyModel", staticmethod(lambda path, *a, **k: tiny_model))  # made once per session
    test = test_class("runTest")
    test.runTest()
    result, node, log = test.result, test.inputNode, test.log
    for new in (result.counterfactual, result.attribution, result.mask):
        assert_same_grid(new, node)
    assert any("Running VANT-GAN" in stage for _, stage in test.progress)
    assert not any(line.startswith("PROGRESS") for line in log)  # progress lines are parsed, not logged
    assert result.summary.thresholds.rule == "percentile"
    assert "CPU" in result.summary.device
    assert "VANT-GAN" in result.attribution.GetDescription()
    np.testing.assert_allclose(
        slicer.util.arrayFromVolume(result.counterfactual),
        slicer.util.arrayFromVolume(node) + slicer.util.arrayFromVolume(result.attribution), rtol=1e-5, atol=1e-3,
    )
    scene = node.GetScene()
    composite = scene.GetNthNodeByClass(0, "vtkMRMLSliceCompositeNode")
    assert composite.GetForegroundVolumeID() == result.attribution.GetID()
    assert composite.GetForegroundOpacity() == pytest.approx(0.5)


# --- the panel's .ui file ---------------------------------------------------------------------------------

UI_FILE = MODULE_DIR / "Resources" / "UI" / "CounterfactualVA.ui"
CONTAINERS = {"qMRMLWidget", "QWidget", "ctkCollapsibleButton", "QGroupBox", "QFrame"}


def test_ui_widgets_and_module_code_agree():
    tree = ET.parse(UI_FILE)
    widgets = {w.get("name"): w.get("class") for w in tree.iter("widget")}
    source = (MODULE_DIR / "CounterfactualVA.py").read_text()
    referenced = set(re.findall(r"self\.ui\.(\w+)", source))
    assert referenced, "the module references no widgets"
    missing = referenced - set(widgets)
    assert not missing, f"module code uses widgets that the .ui lacks: {sorted(missing)}"
    interactive = {name for name, cls in widgets.items() if cls not in CONTAINERS and cls != "QLabel"}
    unused = interactive - referenced
    assert not unused, f".ui widgets that the module never uses: {sorted(unused)}"
    # the parameter-node bindings name real parameters
    bound = {}
    for widget in tree.iter("widget"):
        for prop in widget.findall("property"):
            if prop.get("name") == "SlicerParameterName":
                bound[widget.get("name")] = prop.find("string").text
    parameters = set(re.findall(r"^        (\w+): ", source.split("class CounterfactualVAParameterNode")[1].split("else:")[0], re.M))
    assert set(bound.values()) == parameters - set(module.UNBOUND_PARAMETERS)
    assert bound["inputSelector"] == "inputVolume" and widgets["inputSelector"] == "qMRMLNodeComboBox"
    # path parameters are text (an empty field stays "", never "."), bound by slicer_support's path connector
    assert re.search(r"^        modelPath: str = \"\"$", source, re.M)
    assert widgets["modelPathLineEdit"] == "ctkPathLineEdit" and widgets["opacitySliderWidget"] == "ctkSliderWidget"
    assert widgets["progressBar"] == "QProgressBar" and widgets["logTextEdit"] == "QPlainTextEdit"
    # every custom widget class used is declared
    declared = {c.find("class").text for c in tree.iter("customwidget")}
    assert {cls for cls in widgets.values() if cls.startswith(("ctk", "qMRML"))} <= declared


def test_resources_and_build_files_exist():
    assert (MODULE_DIR / "Resources" / "Icons" / "CounterfactualVA.png").stat().st_size > 1000
    cmake = (MODULE_DIR / "CMakeLists.txt").read_text()
    assert "slicerMacroBuildScriptedModule" in cmake and "GLOB_RECURSE" in cmake and "slicer_add_python_unittest" in cmake
    top = (REPO / "CMakeLists.txt").read_text()
    for needed in ("project(CounterfactualVA)", "EXTENSION_DEPENDS \"PyTorch\"", "add_subdirectory(CounterfactualVA)", "add_subdirectory(CounterfactualVATraining)", "Slicer_EXTENSION_CPACK"):
        assert needed in top
