"""Batch runs into a summary table, the shipped sample's location, and the packaging files (requirements.txt,
the ExtensionsIndex description), against slicer-core's real MRML scene (no Qt, no application)."""

from __future__ import annotations

import json
import re
import sys
import tomllib
from pathlib import Path

import pytest

slicer = pytest.importorskip("slicer")
if not hasattr(slicer, "vtkMRMLScene"):
    pytest.skip("slicer-core (MRML) is not installed", allow_module_level=True)

REPO = Path(__file__).resolve().parents[1]
MODULE_DIR = REPO / "CounterfactualVA"
if str(MODULE_DIR) not in sys.path:
    sys.path.insert(0, str(MODULE_DIR))

import CounterfactualVA as module  # noqa: E402
from CounterfactualVA import CounterfactualVALogic, makeScene  # noqa: E402


@pytest.fixture
def scene():
    scene = makeScene()
    yield scene
    scene.Clear(1)


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    pytest.importorskip("torch")
    return module.CounterfactualVATest.makeTinyModel(tmp_path_factory.mktemp("model") / "tiny3d.safetensors")


def table_rows(tableNode):
    table = tableNode.GetTable()
    names = [table.GetColumnName(c) for c in range(table.GetNumberOfColumns())]
    return [{name: table.GetValue(r, c).ToString() for c, name in enumerate(names)} for r in range(table.GetNumberOfRows())]


# --- batch ---------------------------------------------------------------------------------------------


def test_batch_fills_one_row_per_volume_and_records_failures(scene, tiny_model):
    make = module.CounterfactualVATest.makeObliqueVolume
    first = make(scene, name="ScanA", shape=(12, 14, 16))
    bad = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "EmptyScan")  # no image data: fails validation
    second = make(scene, name="ScanB", shape=(14, 12, 10))
    progress, log = [], []

    tableNode, results = CounterfactualVALogic().runOnVolumes(
        [first, bad, second], tiny_model, device="cpu", thresholdRule="percentile", thresholdValue=95,
        progressCallback=lambda f, s: progress.append(f), logCallback=log.append,
    )

    assert tableNode.IsA("vtkMRMLTableNode") and tableNode.GetName() == "CounterfactualVA summary"
    assert tableNode.GetScene() is scene
    assert tableNode.GetNumberOfRows() == 3
    rows = table_rows(tableNode)
    assert [row["volume"] for row in rows] == ["ScanA", "EmptyScan", "ScanB"]
    assert list(rows[0]) == list(CounterfactualVALogic.BATCH_COLUMNS)
    assert results[1] is None and rows[1]["status"].startswith("error:") and "no image data" in rows[1]["status"]
    assert rows[1]["method"] == rows[1]["mask_voxels"] == rows[1]["outputs"] == ""
    assert any("EmptyScan: ERROR" in line for line in log)
    for row, result in ((rows[0], results[0]), (rows[2], results[2])):
        summary = result.summary
        assert row["status"] == "ok"
        assert row["method"] == summary.method == "vantgan"
        assert float(row["mask_volume_ml"]) == summary.mask_volume_ml  # written exactly
        assert int(row["mask_voxels"]) == summary.mask_voxels > 0
        probability = summary.scalars.get("class_probability")
        assert row["class_probability"] == ("" if probability is None else repr(probability))
        assert row["outputs"].split("; ") == [node.GetName() for node in result.nodes()]
        assert result.attribution.GetName().startswith(row["volume"])
    assert progress == sorted(progress) and progress[-1] == 1.0

    # Given a table, its rows are replaced, not appended to.
    again, _ = CounterfactualVALogic().runOnVolumes([bad], tiny_model, device="cpu", tableNode=tableNode)
    assert again is tableNode and tableNode.GetNumberOfRows() == 1
    assert table_rows(tableNode)[0]["volume"] == "EmptyScan"


def test_batch_without_volumes_is_refused(tiny_model):
    with pytest.raises(ValueError, match="No input volumes"):
        CounterfactualVALogic().runOnVolumes([], tiny_model)


# --- the shipped sample -----------------------------------------------------------------------------------


def test_sample_files_are_found_in_the_source_tree():
    for name in (module.SAMPLE_SCAN, module.SAMPLE_MODEL):
        path = module.sampleFilePath(name)
        assert path is not None, name
        assert Path(path) == (REPO / "samples" / name).resolve()
    assert module.sampleFilePath("no_such_file.nii.gz") is None
    assert module.registerSampleData() is False  # no Slicer application: nothing to register with


def test_installed_samples_are_preferred(tmp_path):
    moduleDir = tmp_path / "lib" / "Slicer-5.9" / "qt-scripted-modules"
    (moduleDir / "Resources" / "Samples").mkdir(parents=True)
    installed = moduleDir / "Resources" / "Samples" / module.SAMPLE_SCAN
    installed.write_bytes(b"x")
    assert module.sampleDirectories(str(moduleDir))[0] == str(moduleDir / "Resources" / "Samples")
    assert module.sampleFilePath(module.SAMPLE_SCAN, str(moduleDir)) == str(installed)
    assert module.sampleFilePath(module.SAMPLE_MODEL, str(moduleDir)) is None


def test_cmake_installs_the_sample_files():
    cmake = (MODULE_DIR / "CMakeLists.txt").read_text()
    listed = re.search(r"set\(MODULE_SAMPLE_FILES(.*?)\)", cmake, re.S).group(1).split()
    assert {module.SAMPLE_SCAN, module.SAMPLE_MODEL} <= set(listed)
    for name in listed:
        assert (REPO / "samples" / name).is_file(), name
    assert "Resources/Samples" in cmake and "Resources/requirements.txt" in cmake


# --- packaging files ---------------------------------------------------------------------------------------


def test_requirements_txt_matches_pyproject():
    """Resources/requirements.txt is what both modules install; pyproject repeats it (torch as the extra)."""
    from CounterfactualVALib.slicer_support.requirements import load_requirements, split_torch

    pyproject = tomllib.loads((REPO / "pyproject.toml").read_text())
    torch, others = split_torch(load_requirements(MODULE_DIR / "Resources" / "requirements.txt"))
    from packaging.requirements import Requirement

    assert others == [Requirement(r) for r in pyproject["project"]["dependencies"]]
    assert [torch] == [Requirement(r) for r in pyproject["project"]["optional-dependencies"]["torch"]]
    source = (MODULE_DIR / "CounterfactualVA.py").read_text() + (REPO / "CounterfactualVATraining" / "CounterfactualVATraining.py").read_text()
    assert "REQUIRED_PACKAGES" not in source and "pip_install(" not in source  # no second list, no install outside the handler


def test_extensions_index_description():
    entry = json.loads((REPO / "docs" / "CounterfactualVA.json").read_text())
    top = (REPO / "CMakeLists.txt").read_text()
    homepage = re.search(r'set\(EXTENSION_HOMEPAGE "([^"]+)"\)', top).group(1)
    category = re.search(r'set\(EXTENSION_CATEGORY "([^"]+)"\)', top).group(1)
    assert entry["$schema"].startswith("https://raw.githubusercontent.com/Slicer/Slicer/main/Schemas/slicer-extension-catalog-entry-schema-")
    assert entry["scm_url"] == homepage
    assert entry["category"] == category
    assert entry["scm_revision"] and entry["build_subdirectory"] == "."
    assert entry["build_dependencies"] == ["PyTorch"]
    assert entry["enabled"] is True and entry["tier"] == 1


def test_method_options_reach_the_command_line():
    from CounterfactualVA import CounterfactualVALogic

    command = CounterfactualVALogic().buildCommand("m.safetensors", "in.nrrd", "out", methodOptions={"samples": 12, "explainer": "gradcam"})
    assert command[command.index("--option") + 1] == "samples=12"
    assert "explainer=gradcam" in command
    from CounterfactualVACLI.cli import _key_values

    assert _key_values(["samples=12", "explainer=gradcam"]) == {"samples": 12, "explainer": "gradcam"}
