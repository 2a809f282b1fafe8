"""A finished attribution folder into new MRML nodes, and what the panel does with them afterwards.

Works on slicer-core's MRML as in the application (no Qt). The attribution module's logic calls
:func:`load_results` when its child process has finished; :func:`recolor_results` applies a new colour map
to every result already in the scene; :func:`fill_batch_table` writes the batch summary table.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass, field

from .. import slicer_nodes
from ..run_summary import RunSummary

PALETTES = tuple(slicer_nodes.DIVERGING_PALETTES)
#: node attributes (``CounterfactualVA.<key>``) that let later palette changes redraw a result
KIND_ATTRIBUTE = "CounterfactualVA.DisplayKind"
CUT_ATTRIBUTE = "CounterfactualVA.OverlayCut"


@dataclass
class CounterfactualVAResult:
    """The nodes one run created (all new; None where the method has no such output) and its summary
    (a :class:`~CounterfactualVALib.run_summary.RunSummary`)."""

    counterfactual: object = None
    attribution: object = None
    mask: object = None
    segmentation: object = None
    extras: dict = field(default_factory=dict)
    summary: RunSummary | None = None

    def __getitem__(self, key):  # result["attribution"] works too
        return getattr(self, key)

    def keys(self):
        return ["counterfactual", "attribution", "mask", "segmentation", "extras", "summary"]

    def nodes(self) -> list:
        return [n for n in (self.counterfactual, self.attribution, self.mask, self.segmentation, *self.extras.values()) if n is not None]


def check_palette(palette: str) -> None:
    if palette not in PALETTES:
        raise ValueError(f"Unknown colour map {palette!r}: use one of {', '.join(PALETTES)}.")


def load_results(
    inputVolumeNode, outDir, opacity: float = 0.6, createSegmentation: bool = False, show: bool = True,
    transparentBelowThreshold: bool = True, palette: str = slicer_nodes.DEFAULT_PALETTE,
) -> CounterfactualVAResult:
    """Load a finished output folder (summary.json + images on the input's grid) into new nodes.

    All files are read and checked against the input's geometry before any node enters the scene, so a
    bad folder adds nothing. transparentBelowThreshold: the signed attribution's colour table is
    transparent for |value| below the mask threshold, so the overlay colours only the attribution that
    passed it and the scan shows unchanged elsewhere (False: the whole map is drawn, white at zero, tinting
    the view). Only the display changes: the attribution node holds the map's values either way.
    palette: the diverging colour map of the signed maps (one of :data:`PALETTES`; ValueError otherwise,
    before anything is read)."""
    check_palette(palette)
    summary = RunSummary.read(outDir)  # SummaryError (a RuntimeError) when missing, damaged or incomplete
    outputs = summary.outputs
    name = inputVolumeNode.GetName()
    # (role, node name, file, labelmap, display kind)
    plan = []
    if outputs.counterfactual:
        plan.append(("counterfactual", f"{name} counterfactual", outputs.counterfactual, False, "intensity"))
    plan.append(("attribution", f"{name} attribution", outputs.attribution, False, "difference"))
    plan.append(("mask", f"{name} attribution mask", outputs.mask, True, "mask"))
    for extra, fileName in outputs.extras.items():
        plan.append((f"extra:{extra}", f"{name} {extra}", fileName, False, outputs.extra_kinds.get(extra, "difference")))

    if outputs.series:
        logging.info("CounterfactualVA: image series outputs (%s) are not loaded into the scene.", ", ".join(outputs.series))
    loaded = [(role, nodeName, slicer_nodes.read_output_like(os.path.join(outDir, fileName), inputVolumeNode, labelmap), kind)
              for role, nodeName, fileName, labelmap, kind in plan]

    result = CounterfactualVAResult(summary=summary)
    added = []
    scene = inputVolumeNode.GetScene()
    existing = {scene.GetNthNode(i).GetID() for i in range(scene.GetNumberOfNodes())}
    try:
        description = summary.description
        method = summary.method
        scalars = json.dumps(summary.scalars)
        for role, nodeName, node, kind in loaded:
            slicer_nodes.add_to_scene_like(node, inputVolumeNode, nodeName)
            added.append(node)
            cut = None
            if role == "attribution" and transparentBelowThreshold:
                maskNode = next(loadedNode for loadedRole, _name, loadedNode, _kind in loaded if loadedRole == "mask")
                cut = slicer_nodes.overlay_threshold(summary, node, maskNode)
            _show(node, kind, inputVolumeNode, palette, cut)
            slicer_nodes.describe(
                node, f"{role_text(role, summary, kind)} {description}", Role=role, Method=method,
                InputNodeID=inputVolumeNode.GetID(), Scalars=scalars, DisplayKind=kind, OverlayCut=cut,
            )
            if role.startswith("extra:"):
                result.extras[role[len("extra:"):]] = node
            else:
                setattr(result, role, node)
        if createSegmentation:
            result.segmentation = slicer_nodes.segmentation_from_labelmap(result.mask, f"{name} attribution segmentation")
            added.append(result.segmentation)
            slicer_nodes.describe(
                result.segmentation, f"Segmentation of the attribution mask. {description}", Role="segmentation",
                Method=method, InputNodeID=inputVolumeNode.GetID(),
            )
        slicer_nodes.place_in_subject_hierarchy(added, inputVolumeNode)
    except BaseException:
        slicer_nodes.remove_nodes(added)
        # and what showing them made on the way (e.g. a new colour table): the scene is left as it was
        made = [scene.GetNthNode(i) for i in range(scene.GetNumberOfNodes())]
        slicer_nodes.remove_nodes([node for node in made if node is not None and node.GetID() not in existing])
        raise
    if show:
        slicer_nodes.show_in_slice_views(
            inputVolumeNode.GetScene(), background=inputVolumeNode, foreground=result.attribution, label=result.mask,
            foreground_opacity=opacity,
        )
    return result


def _show(node, kind, reference, palette, cut=None):
    if kind == "difference":
        slicer_nodes.show_signed_map(node, transparent_below=cut, palette=palette)
    elif kind == "probability":
        slicer_nodes.show_probability(node)
    elif kind == "mask":
        slicer_nodes.show_mask(node)
    else:
        slicer_nodes.show_like(node, reference)


def recolor_results(scene, palette: str) -> list:
    """Draw every signed map this module loaded into `scene` with `palette` (keeping each overlay's
    transparency cut and window); returns the redrawn nodes. The values are not touched."""
    check_palette(palette)
    redrawn = []
    for index in range(scene.GetNumberOfNodesByClass("vtkMRMLScalarVolumeNode")):
        node = scene.GetNthNodeByClass(index, "vtkMRMLScalarVolumeNode")
        if node.GetAttribute(slicer_nodes.ROLE_ATTRIBUTE) is None or node.GetAttribute(KIND_ATTRIBUTE) != "difference":
            continue
        cut = node.GetAttribute(CUT_ATTRIBUTE)
        slicer_nodes.show_signed_map(node, transparent_below=float(cut) if cut else None, palette=palette)
        redrawn.append(node)
    return redrawn


def role_text(role, summary: RunSummary, kind) -> str:
    thresholds = summary.thresholds
    if role == "counterfactual":
        return "Counterfactual (healthy-looking counterpart) of the input."
    if role == "attribution":
        sign = summary.map_sign
        return (
            f"Signed attribution map: {sign}; displayed with a window centred on 0 (blue negative, red positive), "
            "transparent in slice views where |map| is below the mask threshold (the values are the method's)."
        )
    if role == "mask":
        rule, applied = thresholds.rule, thresholds.applied_to_abs_map
        cut = f"{applied:.4g}" if isinstance(applied, (int, float)) else "?"
        return f"Attribution mask: 1 where |map| >= {cut} (threshold rule '{rule}')."
    return f"Method output '{role[len('extra:'):]}' ({kind})."


#: columns of the batch summary table (all text; numbers written exactly, '' when absent) and their descriptions
BATCH_TABLE_NAME = "CounterfactualVA summary"
BATCH_COLUMNS = {
    "volume": "Input volume",
    "method": "Attribution method of the model",
    "class_probability": "Classifier probability of the input (empty when the method has none)",
    "mask_volume_ml": "Volume of the attribution mask",
    "mask_voxels": "Voxels in the attribution mask",
    "outputs": "Nodes created for this volume",
    "status": "'ok', or the error that stopped this volume",
}


def start_batch_table(scene, tableNode=None):
    """A batch table with empty rows and described columns (new unless `tableNode` is given)."""
    import vtk

    if tableNode is None:
        tableNode = scene.AddNewNodeByClass("vtkMRMLTableNode", slicer_nodes.unique_name(scene, BATCH_TABLE_NAME))
    table = tableNode.GetTable()
    wasModifying = tableNode.StartModify()
    try:
        tableNode.RemoveAllColumns()
        for name, description in BATCH_COLUMNS.items():
            column = vtk.vtkStringArray()
            column.SetName(name)
            table.AddColumn(column)
            tableNode.SetColumnDescription(name, description)
        tableNode.SetColumnUnitLabel("mask_volume_ml", "ml")
    finally:
        tableNode.EndModify(wasModifying)
    return tableNode


def batch_row(name: str, result: CounterfactualVAResult | None = None, error: Exception | None = None) -> dict:
    if result is None:
        return {"volume": name, "status": f"error: {error}"}
    summary = result.summary
    return {
        "volume": name, "method": summary.method,
        "class_probability": summary.scalars.get("class_probability"),
        "mask_volume_ml": summary.mask_volume_ml, "mask_voxels": summary.mask_voxels,
        "outputs": "; ".join(node.GetName() for node in result.nodes()), "status": "ok",
    }


def add_batch_row(tableNode, row: dict) -> None:
    def text(value):
        if value is None:
            return ""
        return repr(value) if isinstance(value, float) else str(value)

    table = tableNode.GetTable()
    rowIndex = table.InsertNextBlankRow()
    for columnIndex, column in enumerate(BATCH_COLUMNS):
        table.GetColumn(columnIndex).SetValue(rowIndex, text(row.get(column)))
    table.Modified()
    tableNode.Modified()


def set_opacity(result: CounterfactualVAResult, opacity: float) -> int:
    """Foreground opacity of the slice views that show this result's attribution map; returns how many."""
    node = result.attribution
    if node is None or node.GetScene() is None:
        return 0
    return slicer_nodes.set_foreground_opacity(node.GetScene(), node, opacity)


def finished_lines(result: CounterfactualVAResult) -> list[str]:
    """The panel's log lines for a finished run: device and time, the method's scalars, the nodes made."""
    summary = result.summary
    lines = [f"Done on {summary.device} in {summary.timings_s.get('total', 0.0):.1f} s."]
    lines += [f"{name}: {value:.4g}" for name, value in summary.scalars.items()]
    return lines + ["Created: " + ", ".join(node.GetName() for node in result.nodes())]
