"""Render what the module's slice views show for the shipped sample, without the Slicer application.

Runs ``CounterfactualVALogic().run`` on ``samples/phantom_atrophy.nii.gz`` with
``samples/vantgan_phantom3d.safetensors`` in a slicer-core MRML scene (``makeScene()``: the three slice views'
composite nodes, default colour tables), which sets the layers the way the module does in Slicer: background =
the scan, foreground = the signed attribution map (a 'CounterfactualVA Diverging' colour table, window
centred on 0, transparent where |map| is below half the mask threshold) at the module's default opacity,
label = the attribution mask. Each view's vtkMRMLSliceLogic then
reslices and blends the three layers with its own imaging pipeline (``GetImageDataConnection()``: the very
RGBA image a Slicer slice view draws; no OpenGL window is needed), and the result is written as a PNG.

    OMP_NUM_THREADS=1 python benchmarks/render_slice_views.py            # writes docs/screenshot_{axial,sagittal,coronal}.png
    python benchmarks/render_slice_views.py --out /tmp/views --size 600 --label-outline 0

Each view's plane goes through the mask's centre of mass (field of view fitted to the volumes), so the
slices cut through the detected atrophy.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "CounterfactualVA"))

import slicer  # noqa: E402  (slicer-core)
import vtk  # noqa: E402
from vtk.util import numpy_support  # noqa: E402

from CounterfactualVA import CounterfactualVALogic, makeScene  # noqa: E402
from CounterfactualVALib import slicer_nodes  # noqa: E402

VIEWS = (("Red", "Axial", "axial"), ("Yellow", "Sagittal", "sagittal"), ("Green", "Coronal", "coronal"))


def load_scan(scene, path: Path, name: str):
    node = slicer_nodes.read_volume(path)
    node.SetName(name)
    scene.AddNode(node)
    node.CreateDefaultDisplayNodes()
    display = node.GetDisplayNode()
    display.SetAndObserveColorNodeID("vtkMRMLColorTableNodeGrey")
    array = slicer.util.arrayFromVolume(node)
    low, high = np.percentile(array, (1, 99.5))  # what Slicer's automatic window/level shows, near enough
    display.AutoWindowLevelOff()
    display.SetWindowLevel(float(high - low), float((high + low) / 2))
    return node


def mask_centre_ras(mask_node) -> list[float]:
    """Centre of mass of the mask in RAS (world) coordinates; the volume centre when the mask is empty."""
    mask = slicer.util.arrayFromVolume(mask_node)  # k, j, i
    points = np.argwhere(mask > 0)
    kji = points.mean(axis=0) if len(points) else (np.array(mask.shape) - 1) / 2.0
    ijk1 = np.array([kji[2], kji[1], kji[0], 1.0])
    return list((slicer_nodes.world_ijk_to_ras(mask_node) @ ijk1)[:3])


def slice_image(slice_logic) -> np.ndarray:
    """The slice logic's blended RGBA output as an (rows, columns, 4) uint8 array, top row first."""
    slice_logic.UpdateImageData()
    producer = slice_logic.GetImageDataConnection().GetProducer()
    producer.Update()
    image = producer.GetOutputDataObject(0)
    columns, rows, _ = image.GetDimensions()
    scalars = numpy_support.vtk_to_numpy(image.GetPointData().GetScalars())
    rgba = scalars.reshape(rows, columns, -1)
    if rgba.shape[2] == 3:
        rgba = np.concatenate([rgba, np.full(rgba.shape[:2] + (1,), 255, rgba.dtype)], axis=2)
    rgba = rgba[::-1].astype(np.float32)  # VTK's first row is the bottom one
    # A slice view draws the blended image over black: make that explicit so PNG viewers do not show white.
    alpha = rgba[..., 3:4] / 255.0
    rgb = rgba[..., :3] * alpha
    return np.ascontiguousarray(np.concatenate([rgb, np.full(alpha.shape, 255.0)], axis=2).round().astype(np.uint8))


def write_png(rgba: np.ndarray, path: Path) -> None:
    rows, columns, _ = rgba.shape
    image = vtk.vtkImageData()
    image.SetDimensions(columns, rows, 1)
    data = numpy_support.numpy_to_vtk(np.ascontiguousarray(rgba[::-1]).reshape(-1, 4), deep=True)
    data.SetNumberOfComponents(4)
    image.GetPointData().SetScalars(data)
    writer = vtk.vtkPNGWriter()
    writer.SetFileName(str(path))
    writer.SetInputData(image)
    writer.Write()


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--scan", type=Path, default=REPO / "samples" / "phantom_atrophy.nii.gz")
    parser.add_argument("--model", type=Path, default=REPO / "samples" / "vantgan_phantom3d.safetensors")
    parser.add_argument("--out", type=Path, default=REPO / "docs")
    parser.add_argument("--size", type=int, default=512, help="slice view size in pixels (square)")
    parser.add_argument("--opacity", type=float, default=0.6, help="foreground opacity (the module's default)")
    parser.add_argument("--label-outline", type=int, default=1, help="1: draw the mask as an outline (as Slicer's 'outline' option)")
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args(argv)

    scene = makeScene()
    scan = load_scan(scene, args.scan, "phantom_atrophy")
    result = CounterfactualVALogic().run(scan, str(args.model), device=args.device, opacity=args.opacity, logCallback=lambda line: None)
    summary = result.summary
    print(f"{summary.method}: mask {summary.mask_voxels} voxels ({summary.mask_volume_ml} ml), "
          f"threshold {summary.thresholds.rule}")
    centre = mask_centre_ras(result.mask)

    args.out.mkdir(parents=True, exist_ok=True)
    slice_logics = scene._counterfactualVALogics[3]
    written = []
    for slice_logic, (view, orientation, label) in zip(slice_logics, VIEWS):
        slice_node = slice_logic.GetSliceNode()
        composite = slice_logic.GetSliceCompositeNode()
        assert composite.GetBackgroundVolumeID() == scan.GetID()
        assert composite.GetForegroundVolumeID() == result.attribution.GetID()
        assert composite.GetLabelVolumeID() == result.mask.GetID()
        slice_node.SetOrientation(orientation)
        slice_node.SetDimensions(args.size, args.size, 1)
        slice_node.SetUseLabelOutline(bool(args.label_outline))
        slice_logic.FitSliceToAll()
        slice_node.JumpSliceByOffsetting(*centre)  # move the plane through the mask's centre, keep the field of view
        path = args.out / f"screenshot_{label}.png"
        write_png(slice_image(slice_logic), path)
        written.append(path)
        print(f"{view} ({orientation}) -> {path}")
    scene.Clear(1)
    return 0 if all(p.is_file() for p in written) else 1


if __name__ == "__main__":
    sys.exit(main())
