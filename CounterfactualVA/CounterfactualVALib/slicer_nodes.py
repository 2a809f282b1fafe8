"""The Slicer node adapter: the one place in the library that touches MRML.

It turns a volume node into a file the command line can read (with the node's geometry, a linear parent
transform hardened in), and the command line's output files back into new nodes that sit exactly on the
input's voxel grid (same IJK-to-RAS matrix, same parent transform), with display settings, descriptions
and subject-hierarchy placement. The input node is never modified.

Everything here works both in the Slicer application and with the `slicer-core` wheel (a bare MRML scene
without Qt, without file-based colour tables and without the subject-hierarchy plugins that create
hierarchy items automatically). Only `slicer`, `vtk` and `numpy` are imported.
"""

from __future__ import annotations

import os

import numpy as np
import slicer
import vtk

DESCRIPTION_ATTRIBUTE = "CounterfactualVA.Description"
ROLE_ATTRIBUTE = "CounterfactualVA.Role"
METHOD_ATTRIBUTE = "CounterfactualVA.Method"
INPUT_ATTRIBUTE = "CounterfactualVA.InputNodeID"
SCALARS_ATTRIBUTE = "CounterfactualVA.Scalars"
DIVERGING_COLOR_NODE_NAME = "CounterfactualVA Diverging"
MASK_COLOR_NODE_NAME = "CounterfactualVA Mask"
MASK_SEGMENT_NAME = "attribution mask"
COLOR_ATTRIBUTE = "CounterfactualVA.ColorTable"  # marks the colour nodes this module made, so they are reused

#: geometry must agree to this many millimetres (positions) / this fraction (axis vectors)
GEOMETRY_TOLERANCE = 1e-4


class NodeError(ValueError):
    """An input node that cannot be used: the message says why and what to do."""


# --- input checks and writing ------------------------------------------------------------------


def validate_input_volume(node) -> None:
    """Raise NodeError unless `node` is a scalar (single-component, non-label) volume with image data."""
    if node is None:
        raise NodeError("No input volume: select a scalar volume (the MRI to explain) as input.")
    name = node.GetName() if hasattr(node, "GetName") else str(node)
    if not node.IsA("vtkMRMLVolumeNode"):
        raise NodeError(f"'{name}' is a {node.GetClassName()}, not a volume: select a scalar volume (the MRI to explain).")
    if node.IsA("vtkMRMLLabelMapVolumeNode"):
        raise NodeError(
            f"'{name}' is a labelmap volume (a segmentation), not an image: select the MRI itself as input "
            "(a scalar volume)."
        )
    if node.IsA("vtkMRMLTensorVolumeNode") or node.IsA("vtkMRMLDiffusionWeightedVolumeNode"):
        kind = "vector (RGB/multi-channel)" if node.IsA("vtkMRMLVectorVolumeNode") else "tensor/diffusion"
        raise NodeError(
            f"'{name}' is a {kind} volume; models take one scalar MRI channel. Convert it first "
            "(e.g. 'Vector to Scalar Volume' module) or select a scalar volume."
        )
    image = node.GetImageData()
    if image is None or min(image.GetDimensions()) < 1 or image.GetNumberOfPoints() == 0 or image.GetPointData().GetScalars() is None:
        raise NodeError(f"'{name}' has no image data (nothing is loaded in it): load or select a volume that has voxels.")
    components = image.GetNumberOfScalarComponents()
    if components != 1:
        raise NodeError(
            f"'{name}' has {components} components per voxel (a vector/RGB image); models take one scalar MRI "
            "channel. Convert it with the 'Vector to Scalar Volume' module first."
        )
    if not node.IsA("vtkMRMLScalarVolumeNode"):
        raise NodeError(f"'{name}' is a {node.GetClassName()}; select a scalar volume.")
    _check_transform_is_linear(node)


def _check_transform_is_linear(node) -> None:
    transform = node.GetParentTransformNode()
    if transform is not None and not transform.IsTransformToWorldLinear():
        raise NodeError(
            f"'{node.GetName()}' is under the non-linear transform '{transform.GetName()}'. Harden the transform "
            "on a copy of the volume first (Data module: right-click > 'Harden transform'), or remove it, then "
            "run again on that volume."
        )


def ijk_to_ras(node) -> np.ndarray:
    """The node's own IJK-to-RAS matrix (4x4 numpy), without parent transforms."""
    matrix = vtk.vtkMatrix4x4()
    node.GetIJKToRASMatrix(matrix)
    return slicer.util.arrayFromVTKMatrix(matrix)


def world_ijk_to_ras(node) -> np.ndarray:
    """IJK-to-world-RAS (4x4 numpy) with the (linear) parent transforms applied."""
    local = ijk_to_ras(node)
    transform = node.GetParentTransformNode()
    if transform is None:
        return local
    _check_transform_is_linear(node)
    to_world = vtk.vtkMatrix4x4()
    transform.GetMatrixTransformToWorld(to_world)
    return slicer.util.arrayFromVTKMatrix(to_world) @ local


def write_volume(node, path: str | os.PathLike, compress: bool = False) -> str:
    """Write `node` to `path` (NRRD) with its world geometry: IJK-to-RAS with any linear parent transform
    hardened in. Neither the node nor its image data are modified (a temporary node outside the scene
    shares the voxels)."""
    validate_input_volume(node)
    path = str(path)
    temporary = slicer.vtkMRMLScalarVolumeNode()
    temporary.SetName(node.GetName())
    temporary.SetAndObserveImageData(node.GetImageData())
    temporary.SetIJKToRASMatrix(slicer.util.vtkMatrixFromArray(world_ijk_to_ras(node)))
    storage = slicer.vtkMRMLVolumeArchetypeStorageNode()
    storage.SetFileName(path)
    storage.SetUseCompression(1 if compress else 0)
    ok = storage.WriteData(temporary)
    temporary.SetAndObserveImageData(None)
    if not ok or not os.path.isfile(path):
        raise RuntimeError(f"Could not write '{node.GetName()}' to {path}: check that the folder is writable and the disk is not full.")
    return path


# --- reading outputs into new nodes ---------------------------------------------------------------


def read_volume(path: str | os.PathLike, labelmap: bool = False):
    """A new volume node (NOT added to any scene) holding the file's voxels and file geometry."""
    node = slicer.vtkMRMLLabelMapVolumeNode() if labelmap else slicer.vtkMRMLScalarVolumeNode()
    storage = slicer.vtkMRMLVolumeArchetypeStorageNode()
    storage.SetFileName(str(path))
    storage.SetSingleFile(1)  # never pick up neighbouring files as a series
    if not os.path.isfile(str(path)) or not storage.ReadData(node) or node.GetImageData() is None:
        raise RuntimeError(f"Could not read the output file {path}: it is missing or damaged.")
    return node


def geometry_mismatch(node, reference_matrix: np.ndarray, reference_dimensions) -> str | None:
    """None when `node`'s voxel grid equals the reference; otherwise a sentence saying what differs.

    Every axis is compared, those of size 1 too: the command line writes a one-slice input's outputs in that
    file's own 3D geometry (slice normal and position included), so they match it exactly."""
    dims = tuple(node.GetImageData().GetDimensions())
    if dims != tuple(reference_dimensions):
        return f"size {dims} instead of {tuple(reference_dimensions)}"
    matrix = ijk_to_ras(node)
    scale = max(1.0, float(np.abs(reference_matrix[:3, :3]).max()))
    if not np.allclose(matrix[:3, 3], reference_matrix[:3, 3], atol=GEOMETRY_TOLERANCE * scale):
        return f"origin {matrix[:3, 3]} instead of {reference_matrix[:3, 3]}"
    for axis in range(3):
        if not np.allclose(matrix[:3, axis], reference_matrix[:3, axis], atol=GEOMETRY_TOLERANCE * scale):
            return f"axis {axis} vector {matrix[:3, axis]} instead of {reference_matrix[:3, axis]}"
    return None


def matrices_equal(a, b, tolerance: float = 1e-9) -> bool:
    a = slicer.util.arrayFromVTKMatrix(a) if isinstance(a, vtk.vtkMatrix4x4) else np.asarray(a)
    b = slicer.util.arrayFromVTKMatrix(b) if isinstance(b, vtk.vtkMatrix4x4) else np.asarray(b)
    return bool(np.allclose(a, b, rtol=0, atol=tolerance))


def read_output_like(path: str | os.PathLike, reference, labelmap: bool = False):
    """Read `path` into a new node (not in a scene) and give it `reference`'s exact local geometry.

    The file must lie on the reference's world grid (as written by :func:`write_volume`); this is checked,
    then the reference's own origin, spacing and directions are copied, so the new node matches it to rounding (the
    parent transform is copied when the node is added to the scene, see :func:`add_to_scene_like`)."""
    node = read_volume(path, labelmap=labelmap)
    problem = geometry_mismatch(node, world_ijk_to_ras(reference), reference.GetImageData().GetDimensions())
    if problem:
        raise RuntimeError(
            f"The output {os.path.basename(str(path))} is not on the input's voxel grid ({problem}). "
            "This is a bug in CounterfactualVA; please report it with the input's geometry."
        )
    # Origin, spacing and axis directions copied from the reference (MRML re-normalises directions on set, so
    # the matrices agree to ~1e-15, not bit for bit).
    node.CopyOrientation(reference)
    return node


def add_to_scene_like(node, reference, name: str):
    """Add a new node to the reference's scene under a unique name, with the reference's parent transform
    and default display nodes; returns the node."""
    scene = reference.GetScene()
    node.SetName(unique_name(scene, name))
    scene.AddNode(node)
    node.SetAndObserveTransformNodeID(reference.GetTransformNodeID())
    node.CreateDefaultDisplayNodes()
    return node


def unique_name(scene, name: str) -> str:
    if scene.GetFirstNodeByName(name) is None:
        return name
    return scene.GenerateUniqueName(name)


def same_world_geometry(node, reference) -> bool:
    """True when both nodes have the same IJK-to-RAS, the same parent transform and the same size."""
    return (
        matrices_equal(ijk_to_ras(node), ijk_to_ras(reference))
        and node.GetTransformNodeID() == reference.GetTransformNodeID()
        and tuple(node.GetImageData().GetDimensions()) == tuple(reference.GetImageData().GetDimensions())
    )


# --- colour tables and display ----------------------------------------------------------------------


def _find_color_node(scene, key: str):
    for i in range(scene.GetNumberOfNodesByClass("vtkMRMLColorTableNode")):
        node = scene.GetNthNodeByClass(i, "vtkMRMLColorTableNode")
        if node.GetAttribute(COLOR_ATTRIBUTE) == key:
            return node
    return None


#: named diverging palettes for signed maps: (negative end, mid-negative, mid-positive, positive end), white at
#: zero. "blue-red" is the default; "purple-orange" and "green-magenta" (ColorBrewer PuOr / PiYG) stay
#: distinguishable for red-green colour-blind readers.
DIVERGING_PALETTES = {
    "blue-red": ((0.02, 0.19, 0.58), (0.26, 0.58, 0.86), (0.93, 0.40, 0.29), (0.60, 0.0, 0.05)),
    "purple-orange": ((0.33, 0.15, 0.53), (0.60, 0.56, 0.76), (0.95, 0.64, 0.25), (0.70, 0.35, 0.02)),
    "green-magenta": ((0.15, 0.39, 0.10), (0.50, 0.74, 0.25), (0.87, 0.47, 0.68), (0.56, 0.0, 0.32)),
}
DEFAULT_PALETTE = "blue-red"


def _palette_anchors(palette: str) -> dict:
    if palette not in DIVERGING_PALETTES:
        raise ValueError(f"Unknown colour map {palette!r}: use one of {', '.join(DIVERGING_PALETTES)}.")
    negative, mid_negative, mid_positive, positive = (np.array(c) for c in DIVERGING_PALETTES[palette])
    return {"negative": negative, "mid_negative": mid_negative, "white": np.array([1.0, 1.0, 1.0]),
            "mid_positive": mid_positive, "positive": positive}


_DIVERGING_ANCHORS = _palette_anchors(DEFAULT_PALETTE)


def _diverging_rgb(t: float, anchors: dict | None = None) -> np.ndarray:
    """Negative colour - white - positive colour for t in [-1, 1] (white at 0; blue - red by default)."""
    c = _DIVERGING_ANCHORS if anchors is None else anchors
    a = abs(t)
    high = c["mid_negative"] if t < 0 else c["mid_positive"]
    end = c["negative"] if t < 0 else c["positive"]
    return c["white"] + (high - c["white"]) * (a / 0.5) if a <= 0.5 else high + (end - high) * ((a - 0.5) / 0.5)


def _palette_key(key: str, palette: str) -> str:
    """Colour-table key of a palette: the default palette keeps the plain key (tables of earlier scenes are reused)."""
    return key if palette == DEFAULT_PALETTE else f"{key}:{palette}"


def _palette_name(name: str, palette: str) -> str:
    return name if palette == DEFAULT_PALETTE else f"{name} {palette}"


def _make_diverging_table(scene, key: str, name: str, entries: int, alphas, description: str, palette: str = DEFAULT_PALETTE):
    anchors = _palette_anchors(palette)
    node = slicer.vtkMRMLColorTableNode()
    node.SetName(name)
    node.SetAttribute(COLOR_ATTRIBUTE, key)
    node.SetTypeToUser()
    node.SetNumberOfColors(entries)
    for i in range(entries):
        rgb = _diverging_rgb(2.0 * i / (entries - 1) - 1.0, anchors)
        node.SetColor(i, "", float(rgb[0]), float(rgb[1]), float(rgb[2]), 1.0 if alphas is None else float(alphas[i]))
    node.SetDescription(description)
    scene.AddNode(node)
    return node


def diverging_color_node(scene, entries: int = 256, palette: str = DEFAULT_PALETTE):
    """The 'CounterfactualVA Diverging' colour table (blue - white - red, white at the centre entry), made
    in code on first use and reused afterwards. Pair it with a window centred on 0 (:func:`set_symmetric_window`)
    so that white means 'no difference', blue 'counterfactual darker than input', red 'brighter'.

    `palette`: one of :data:`DIVERGING_PALETTES` (ValueError otherwise); each palette has its own table
    ('CounterfactualVA Diverging purple-orange', ...), the default keeps the plain name."""
    _palette_anchors(palette)
    key = _palette_key("diverging", palette)
    node = _find_color_node(scene, key)
    if node is not None:
        return node
    low, high = palette.split("-", 1)
    return _make_diverging_table(
        scene, key, _palette_name(DIVERGING_COLOR_NODE_NAME, palette), entries, None,
        f"Diverging colour map for signed CounterfactualVA maps: {low} negative, white zero, {high} positive. "
        "Use with a window centred on 0.",
        palette,
    )


#: the signed overlay is transparent where |map| is below this fraction of the mask threshold: the mask's voxels
#: and their surroundings under the slice view's linear interpolation show (an isolated voxel above the threshold
#: would otherwise vanish between voxel centres); the diverging colours themselves fade to white towards the cut
OVERLAY_CUT_FRACTION = 0.5


def overlay_alphas(fraction: float, entries: int = 256) -> np.ndarray:
    """Alpha (0 or 1) of each colour-table entry for a window [-m, m] such that every value with
    |v| >= fraction * m is drawn and values below it are not.

    Slice views treat a scalar volume's colour-table alpha as on/off (any alpha above 0 draws the voxel at the
    layer's opacity: measured with vtkMRMLSliceLogic), so there is no fading. They map a value to an entry
    through window/level (256 grey levels over the window, then the table), so each entry is judged by the
    largest |v| it can receive plus one entry of margin: values at most ~2 entries (under 1.6 % of m) below
    the cut may be drawn too, values at or above it always are."""
    fraction = min(max(float(fraction), 0.0), 1.0)
    step = 2.0 / entries
    lower = -1.0 + step * np.arange(entries)
    largest = np.maximum(np.abs(lower), np.abs(lower + step)) + step
    return (largest >= fraction).astype(float)


def signed_overlay_color_node(scene, fraction: float, entries: int = 256, palette: str = DEFAULT_PALETTE):
    """A diverging table like :func:`diverging_color_node` whose centre entries are transparent (see
    :func:`overlay_alphas`): used with a window [-m, m], values with |v| < fraction * m are not drawn in slice
    views (the layer below shows unchanged) and the others keep the diverging colours. Slice views honour a
    colour table's alpha for scalar volumes (checked by rendering with vtkMRMLSliceLogic,
    Testing/test_slicer_logic.py), so this needs no copy of the voxels and the data probe still shows the
    map's own values.

    One table per distinct transparent band, reused (the 'paper' rule's cut at half the maximum always gives
    the same one), and per `palette` (see :func:`diverging_color_node`). The opaque table when nothing would
    be transparent."""
    _palette_anchors(palette)
    alphas = overlay_alphas(fraction, entries)
    if alphas.min() >= 1.0:
        return diverging_color_node(scene, entries, palette)
    hidden = np.flatnonzero(alphas == 0)
    key = _palette_key(f"diverging-overlay:{entries}:{hidden[0]}:{hidden[-1]}", palette)
    node = _find_color_node(scene, key)
    if node is not None:
        return node
    percent = 100.0 * fraction
    low, high = palette.split("-", 1)
    return _make_diverging_table(
        scene, key, f"{_palette_name(DIVERGING_COLOR_NODE_NAME, palette)} (transparent below {percent:.3g}%)", entries, alphas,
        f"Diverging colour map for signed CounterfactualVA overlays ({low} negative, {high} positive), transparent "
        f"for |value| below {percent:.3g}% of the window's half-width. Use with a window centred on 0.",
        palette,
    )


def mask_color_node(scene):
    """'CounterfactualVA Mask': label 0 transparent background, label 1 'attribution mask' (yellow)."""
    node = _find_color_node(scene, "mask")
    if node is not None:
        return node
    node = slicer.vtkMRMLColorTableNode()
    node.SetName(MASK_COLOR_NODE_NAME)
    node.SetAttribute(COLOR_ATTRIBUTE, "mask")
    node.SetTypeToUser()
    node.SetNumberOfColors(2)
    node.SetColor(0, "background", 0.0, 0.0, 0.0, 0.0)
    node.SetColor(1, MASK_SEGMENT_NAME, 1.0, 0.84, 0.0, 1.0)
    node.SetDescription("Labels of CounterfactualVA attribution masks: 1 = |map| above the threshold.")
    scene.AddNode(node)
    return node


def set_symmetric_window(node, max_abs: float | None = None) -> float:
    """Display window [-m, m] centred on 0, with m = max |value| unless given; returns m."""
    if max_abs is None:
        array = slicer.util.arrayFromVolume(node)
        max_abs = float(np.abs(array).max()) if array.size else 0.0
    if not np.isfinite(max_abs) or max_abs <= 0:
        max_abs = 1.0  # an all-zero map: any symmetric window shows it as white
    display = node.GetDisplayNode()
    display.AutoWindowLevelOff()
    display.SetWindowLevel(2.0 * max_abs, 0.0)
    return max_abs


def show_signed_map(node, max_abs: float | None = None, transparent_below: float | None = None, palette: str = DEFAULT_PALETTE) -> float:
    """Diverging colours and a window [-m, m] centred on zero (m = max |value| unless given); returns m.

    `transparent_below` (a value in the map's units, see :func:`overlay_threshold`): voxels with |value|
    below it are transparent in slice views (:func:`overlay_alphas`), so a foreground overlay colours the
    strong attribution and leaves the anatomy underneath untouched elsewhere. None or 0: every voxel is drawn (white
    at zero), as for maps shown on their own. `palette`: the diverging colours (:data:`DIVERGING_PALETTES`,
    ValueError for an unknown name, before anything changes). The voxels are never changed."""
    _palette_anchors(palette)
    display = node.GetDisplayNode()
    m = set_symmetric_window(node, max_abs)
    scene = node.GetScene()
    if transparent_below is not None and transparent_below > 0:
        color = signed_overlay_color_node(scene, float(transparent_below) / m, palette=palette)
    else:
        color = diverging_color_node(scene, palette=palette)
    display.SetAndObserveColorNodeID(color.GetID())
    return m


def overlay_threshold(summary, attribution, mask=None, fraction: float = OVERLAY_CUT_FRACTION) -> float | None:
    """The |map| below which the signed overlay is transparent: `fraction` of the threshold the mask was made
    with (``summary.thresholds.applied_to_abs_map`` of a :class:`~CounterfactualVALib.run_summary.RunSummary`,
    else the smallest |map| inside the mask); None when neither is known (then the whole map is drawn)."""
    applied = summary.thresholds.applied_to_abs_map if summary is not None else None
    if not (isinstance(applied, (int, float)) and np.isfinite(applied) and applied > 0):
        applied = None
        if mask is not None:
            inside = slicer.util.arrayFromVolume(mask) > 0
            values = np.abs(slicer.util.arrayFromVolume(attribution))
            if inside.shape == values.shape and inside.any():
                applied = float(values[inside].min()) or None
    return None if applied is None else fraction * float(applied)


def show_like(node, reference) -> None:
    """Same colour table and window/level as the reference volume (for a counterfactual image)."""
    display, source = node.GetDisplayNode(), reference.GetDisplayNode()
    if display is None or source is None:
        return
    if source.GetColorNodeID():
        display.SetAndObserveColorNodeID(source.GetColorNodeID())
    display.AutoWindowLevelOff()
    display.SetWindowLevel(source.GetWindow(), source.GetLevel())


def show_probability(node) -> None:
    display = node.GetDisplayNode()
    scene = node.GetScene()
    for color_id in ("vtkMRMLColorTableNodeFileInferno.txt", "vtkMRMLColorTableNodeIron"):
        if scene.GetNodeByID(color_id) is not None:
            display.SetAndObserveColorNodeID(color_id)
            break
    display.AutoWindowLevelOff()
    display.SetWindowLevel(1.0, 0.5)


def show_mask(node) -> None:
    node.GetDisplayNode().SetAndObserveColorNodeID(mask_color_node(node.GetScene()).GetID())


def show_in_slice_views(scene, background=None, foreground=None, label=None, foreground_opacity: float | None = None) -> int:
    """Set the layers of every slice view (slice composite node) of the scene; returns how many were set.

    A bare scene without views has none; in the application there is one per slice view."""
    count = 0
    for i in range(scene.GetNumberOfNodesByClass("vtkMRMLSliceCompositeNode")):
        composite = scene.GetNthNodeByClass(i, "vtkMRMLSliceCompositeNode")
        if background is not None:
            composite.SetBackgroundVolumeID(background.GetID())
        if foreground is not None:
            composite.SetForegroundVolumeID(foreground.GetID())
        if label is not None:
            composite.SetLabelVolumeID(label.GetID())
        if foreground_opacity is not None:
            composite.SetForegroundOpacity(float(foreground_opacity))
        count += 1
    return count


def set_foreground_opacity(scene, foreground, opacity: float) -> int:
    """Change the foreground opacity of the slice views that show `foreground`."""
    count = 0
    for i in range(scene.GetNumberOfNodesByClass("vtkMRMLSliceCompositeNode")):
        composite = scene.GetNthNodeByClass(i, "vtkMRMLSliceCompositeNode")
        if foreground is not None and composite.GetForegroundVolumeID() == foreground.GetID():
            composite.SetForegroundOpacity(float(opacity))
            count += 1
    return count


# --- segmentation, descriptions, subject hierarchy ----------------------------------------------------


def segmentation_from_labelmap(labelmap, name: str):
    """A new segmentation node (in the labelmap's scene, same parent transform, reference geometry from the
    labelmap) with one segment 'attribution mask' made from label 1. Returns the node."""
    scene = labelmap.GetScene()
    segmentation = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", unique_name(scene, name))
    segmentation.SetAndObserveTransformNodeID(labelmap.GetTransformNodeID())
    segmentation.CreateDefaultDisplayNodes()
    segmentation.SetReferenceImageGeometryParameterFromVolumeNode(labelmap)
    ok = slicer.vtkSlicerSegmentationsModuleLogic.ImportLabelmapToSegmentationNode(labelmap, segmentation)
    if not ok:
        scene.RemoveNode(segmentation)
        raise RuntimeError(f"Could not turn '{labelmap.GetName()}' into a segmentation.")
    if segmentation.GetSegmentation().GetNumberOfSegments() == 0:
        segmentation.GetSegmentation().AddEmptySegment("attribution_mask", MASK_SEGMENT_NAME, [1.0, 0.84, 0.0])
    return segmentation


def describe(node, text: str, **attributes) -> None:
    """Put `text` in the node's 'CounterfactualVA.Description' attribute and its description, plus any
    further `CounterfactualVA.<key>` attributes."""
    node.SetAttribute(DESCRIPTION_ATTRIBUTE, text)
    if hasattr(node, "SetDescription"):
        node.SetDescription(text)
    for key, value in attributes.items():
        if value is not None:
            node.SetAttribute(f"CounterfactualVA.{key}", str(value))


def place_in_subject_hierarchy(nodes, reference) -> None:
    """Put `nodes` next to `reference` in the subject hierarchy (same folder/study), when there is one.

    Slicer's application creates hierarchy items for new nodes itself; a bare scene (slicer-core) does not,
    so missing items are created here."""
    scene = reference.GetScene()
    sh = scene.GetSubjectHierarchyNode() if scene is not None else None
    if sh is None:
        return
    reference_item = sh.GetItemByDataNode(reference)
    parent = sh.GetItemParent(reference_item) if reference_item else sh.GetSceneItemID()
    if not parent:
        parent = sh.GetSceneItemID()
    for node in nodes:
        if node is None:
            continue
        item = sh.GetItemByDataNode(node)
        if item:
            sh.SetItemParent(item, parent)
        else:
            sh.CreateItem(parent, node)


def remove_nodes(nodes) -> None:
    """Remove nodes (and their display and storage nodes) from their scene."""
    for node in nodes:
        if node is None or node.GetScene() is None:
            continue
        scene = node.GetScene()
        if hasattr(node, "GetNumberOfDisplayNodes"):
            for i in reversed(range(node.GetNumberOfDisplayNodes())):
                display = node.GetNthDisplayNode(i)
                if display is not None:
                    scene.RemoveNode(display)
        scene.RemoveNode(node)


def node_state(node) -> dict:
    """A comparable snapshot of a volume node (name, attributes, geometry, transform, voxels' checksum);
    used to prove that the input is left unchanged."""
    import hashlib

    attributes = {}
    for key in node.GetAttributeNames() or ():
        attributes[key] = node.GetAttribute(key)
    array = slicer.util.arrayFromVolume(node)
    return {
        "name": node.GetName(),
        "attributes": attributes,
        "ijk_to_ras": ijk_to_ras(node).tolist(),
        "transform": node.GetTransformNodeID(),
        "display": node.GetDisplayNodeID(),
        "storage": node.GetStorageNodeID(),
        "dimensions": tuple(node.GetImageData().GetDimensions()),
        "dtype": str(array.dtype),
        "sha256": hashlib.sha256(np.ascontiguousarray(array).tobytes()).hexdigest(),
        "image_data": node.GetImageData(),
    }
