"""What the modules' self-tests and the pytest suite build: a tiny model, an oblique volume, a scene set up
like the application's (for slicer-core). Test helpers only; nothing in the modules' run path uses them."""

from __future__ import annotations

import slicer
import vtk


def make_tiny_model(path, spatialDims: int = 3, size: int = 16, seed: int = 0) -> str:
    """A VANT-GAN model file with random weights (a valid file, not a good model); needs torch."""
    import torch
    from CounterfactualVALib.checkpoint import ModelMetadata, save_model
    from CounterfactualVALib.methods import create_method
    from CounterfactualVALib.preprocessing import PreprocessingConfig

    torch.manual_seed(seed)
    method = create_method("vantgan", spatialDims, {"ngf": 4, "n_blocks": 1, "ndf": 4}, training=False)
    preprocessing = PreprocessingConfig(spatial_dims=spatialDims, size=(size,) * spatialDims, spacing=(3.0,) * spatialDims).to_dict()
    metadata = ModelMetadata(
        method="vantgan", method_config=method.config, preprocessing=preprocessing, networks=list(method.inference_networks),
        outputs=list(method.outputs), training={"command": "self-test", "steps": 0, "data_summary": "no data (random weights)"},
    )
    return str(save_model(path, method.inference_state_dict(), metadata))

def make_oblique_volume(scene, name="SelfTestMRI", shape=(20, 24, 22)):
    """An anisotropic, oblique, off-origin scalar volume with a bright ellipsoid and an off-centre blob."""
    import numpy as np

    k, j, i = np.meshgrid(*[np.arange(n, dtype=np.float32) for n in shape], indexing="ij")
    centre = [(n - 1) / 2 for n in shape]
    r2 = sum(((g - c) / (0.38 * n)) ** 2 for g, c, n in zip((k, j, i), centre, shape))
    array = np.where(r2 < 1, 100.0, 5.0).astype(np.float32)
    array[((k - centre[0]) ** 2 + (j - centre[1] - 3) ** 2 + (i - centre[2] + 3) ** 2) < 6] += 80
    array += np.random.default_rng(0).normal(0, 1, array.shape).astype(np.float32)
    node = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", name)
    slicer.util.updateVolumeFromArray(node, array)
    transform = vtk.vtkTransform()
    transform.PostMultiply()
    transform.Scale(1.2, 0.9, 2.5)
    transform.RotateX(17)
    transform.RotateZ(-28)
    transform.Translate(-31.5, 14.25, 62.0)
    node.SetIJKToRASMatrix(transform.GetMatrix())
    node.CreateDefaultDisplayNodes()
    return node


def make_scene():
    """A scene set up the way the application sets one up, for slicer-core: default colour tables,
    subject hierarchy logic and the three slice views' composite nodes."""
    scene = slicer.vtkMRMLScene()
    colorLogic = slicer.vtkMRMLColorLogic()
    colorLogic.SetMRMLScene(scene)
    subjectHierarchyLogic = slicer.vtkSlicerSubjectHierarchyModuleLogic()
    subjectHierarchyLogic.SetMRMLScene(scene)
    applicationLogic = slicer.vtkMRMLApplicationLogic()
    applicationLogic.SetMRMLScene(scene)
    sliceLogics = []
    for viewName in ("Red", "Yellow", "Green"):
        sliceLogic = slicer.vtkMRMLSliceLogic()
        sliceLogic.SetMRMLScene(scene)
        sliceLogic.SetMRMLApplicationLogic(applicationLogic)
        sliceLogic.AddSliceNode(viewName)
        sliceLogics.append(sliceLogic)
    # Keep the logics alive as long as the scene object is used from Python.
    scene._counterfactualVALogics = (colorLogic, subjectHierarchyLogic, applicationLogic, sliceLogics)
    return scene


def make_tiny_cohort(folder, n: int = 24, size: int = 32, seed: int = 0) -> str:
    """A 2D cohort CSV of `n` images (half normal: a smooth disc; half abnormal: the disc with a dark spot,
    whose difference map is the row's mask, for validation) for the training self-test; the research
    harness's generators are not shipped into Slicer."""
    import os

    import numpy as np
    import SimpleITK as sitk
    from ..cohort import write_cohort_csv

    rng = np.random.default_rng(seed)
    os.makedirs(folder, exist_ok=True)
    y, x = np.mgrid[:size, :size].astype(np.float32)
    rows = []
    for index in range(n):
        label = index % 2
        image = np.where((y - size / 2) ** 2 + (x - size / 2) ** 2 < (0.4 * size) ** 2, 1.0, 0.0).astype(np.float32)
        difference = np.zeros_like(image)
        if label:
            cy, cx = rng.integers(size // 3, 2 * size // 3, 2)
            spot = (y - cy) ** 2 + (x - cx) ** 2 < (size / 10) ** 2
            difference[spot] = 0.7 * image[spot]
            image -= difference
        image += rng.normal(0, 0.05, image.shape).astype(np.float32)
        path, mask = (os.path.join(folder, f"{kind}_{index:03d}.nii.gz") for kind in ("image", "difference"))
        sitk.WriteImage(sitk.GetImageFromArray(image), path)
        sitk.WriteImage(sitk.GetImageFromArray(difference), mask)
        rows.append({"path": path, "label": label, "mask": mask})
    return str(write_cohort_csv(os.path.join(folder, "cohort.csv"), rows))


def poll_until_done(test, process, timeout_s: float = 300.0) -> None:
    """Poll a run the way the panels' timers do (keeping the application responsive where there is one)
    until it ends, failing `test` with the run's log if it takes longer than `timeout_s`."""
    import time

    from .framework import qt

    deadline = time.monotonic() + timeout_s
    while not process.poll():
        test.assertLess(time.monotonic(), deadline, "\n".join(test.log))
        if qt is not None and hasattr(slicer, "app"):
            slicer.app.processEvents()
        time.sleep(0.05)


def attribution_end_to_end(test, logic, scene):
    """The attribution panel's path, checked with `test`'s assertions (a unittest.TestCase: the module's
    self-test): an oblique volume under a linear transform, in a subject-hierarchy folder, run without
    blocking and polled like the widget's timer does, with a segmentation. Leaves ``test.process``,
    ``test.result``, ``test.inputNode``, ``test.shFolder``, ``test.progress`` and ``test.log`` for callers."""
    import os
    import shutil
    import tempfile

    import numpy as np

    from .. import slicer_nodes

    folder = tempfile.mkdtemp(prefix="CounterfactualVATest-")
    try:
        model = test.makeTinyModel(os.path.join(folder, "tiny.safetensors"))  # the test class's makers (a suite may swap them)
        inputNode = test.makeObliqueVolume(scene)
        transformNode = scene.AddNewNodeByClass("vtkMRMLLinearTransformNode", "SelfTestRegistration")
        transform = vtk.vtkTransform()
        transform.RotateY(11)
        transform.Translate(4.5, -3.25, 9.0)
        transformNode.SetMatrixTransformToParent(transform.GetMatrix())
        inputNode.SetAndObserveTransformNodeID(transformNode.GetID())
        sh = scene.GetSubjectHierarchyNode()
        shFolder = sh.CreateFolderItem(sh.GetSceneItemID(), "SelfTestScans")
        if sh.GetItemByDataNode(inputNode):
            sh.SetItemParent(sh.GetItemByDataNode(inputNode), shFolder)
        else:
            sh.CreateItem(shFolder, inputNode)
        before = slicer_nodes.node_state(inputNode)
        test.progress, test.log = [], []

        process = logic.run(
            inputNode, model, device="cpu", thresholdRule="percentile", thresholdValue=95, opacity=0.5,
            createSegmentation=True, waitForCompletion=False,
            progressCallback=lambda f, stage: test.progress.append((f, stage)), logCallback=test.log.append,
        )
        poll_until_done(test, process)
        result = process.result
        test.process, test.result, test.inputNode, test.shFolder = process, result, inputNode, shFolder

        test.assertEqual(
            [node.GetName() for node in result.nodes()],
            ["SelfTestMRI counterfactual", "SelfTestMRI attribution", "SelfTestMRI attribution mask", "SelfTestMRI attribution segmentation"],
        )
        for node in (result.counterfactual, result.attribution, result.mask):
            test.assertTrue(slicer_nodes.same_world_geometry(node, inputNode), node.GetName())
            test.assertTrue(slicer_nodes.matrices_equal(slicer_nodes.world_ijk_to_ras(node), slicer_nodes.world_ijk_to_ras(inputNode)))
            test.assertEqual(sh.GetItemParent(sh.GetItemByDataNode(node)), shFolder)
            test.assertTrue(node.GetAttribute(slicer_nodes.DESCRIPTION_ATTRIBUTE))
        test.assertEqual(result.segmentation.GetTransformNodeID(), transformNode.GetID())
        test.assertEqual(result.segmentation.GetSegmentation().GetNumberOfSegments(), 1)
        mask = slicer.util.arrayFromVolume(result.mask)
        test.assertTrue(set(np.unique(mask)) <= {0, 1} and mask.any())
        display = result.attribution.GetDisplayNode()
        test.assertTrue(display.GetColorNode().GetName().startswith(slicer_nodes.DIVERGING_COLOR_NODE_NAME))
        test.assertEqual(display.GetLevel(), 0.0)
        fractions = [f for f, _ in test.progress]
        test.assertEqual(fractions, sorted(fractions))
        test.assertEqual(fractions[-1], 1.0)
        test.assertFalse(os.path.exists(process.tempDir))
        test.assertEqual(slicer_nodes.node_state(inputNode), before)  # the input is untouched
    finally:
        shutil.rmtree(folder, ignore_errors=True)
