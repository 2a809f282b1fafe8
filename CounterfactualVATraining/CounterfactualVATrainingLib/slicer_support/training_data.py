"""The training module's data side, without Qt: the cohort check before training and the live log table.

Two mixins of ``CounterfactualVATrainingLogic`` (moved out of the module file so that it stays a thin panel
and its logic): :class:`DatasetPreviewMixin` reads every image header of a cohort and says what is wrong;
:class:`TrainingLogMixin` mirrors a run's ``log.csv`` into a table node and a loss chart (MRML, works on
slicer-core). Imports of SimpleITK and the cohort code are lazy: the panel opens without them.
"""

from __future__ import annotations

import math
import os
import tempfile

import slicer
import vtk

from CounterfactualVALib.run_files import LOG_NAME

IMAGE_EXTENSIONS = (".nii.gz", ".nii", ".nrrd", ".nhdr", ".mha", ".mhd")
COHORT_CSV_NAME = "cohort.csv"
MODEL_PATH_ATTRIBUTE = "CounterfactualVA.ModelPath"
RUN_FOLDER_ATTRIBUTE = "CounterfactualVATraining.RunFolder"
#: plot colours of the loss series (slicer-core scenes have no colour tables for SetUniqueColor)
SERIES_COLORS = (
    (0.12, 0.47, 0.71), (1.0, 0.5, 0.05), (0.17, 0.63, 0.17), (0.84, 0.15, 0.16), (0.58, 0.4, 0.74),
    (0.55, 0.34, 0.29), (0.89, 0.47, 0.76), (0.5, 0.5, 0.5), (0.74, 0.74, 0.13), (0.09, 0.75, 0.81),
)


class DatasetPreviewMixin:
    """Checks a cohort (a CSV, or two folders) before anything is trained."""

    @staticmethod
    def _imageFiles(folder) -> list:
        files = []
        for root, dirs, names in os.walk(folder):
            dirs[:] = sorted(d for d in dirs if not d.startswith("."))
            for name in sorted(names):
                if not name.startswith(".") and name.lower().endswith(IMAGE_EXTENSIONS):
                    files.append(os.path.join(root, name))
        return files

    @staticmethod
    def _readHeader(path):
        """(dimension, size, components) from the file header, or raise ValueError saying why it cannot be read."""
        import SimpleITK as sitk

        if not os.path.exists(path):
            raise ValueError("file not found")
        if os.path.isdir(path):
            raise ValueError("a folder, not an image file")
        reader = sitk.ImageFileReader()
        reader.SetFileName(str(path))
        try:
            reader.ReadImageInformation()
        except RuntimeError as exc:
            lines = [line.strip() for line in str(exc).strip().splitlines() if line.strip()]
            reason = lines[-1] if lines else "unknown reader error"
            raise ValueError(f"not an image SimpleITK can read ({reason})") from None
        return reader.GetDimension(), tuple(reader.GetSize()), reader.GetNumberOfComponents()

    @staticmethod
    def _listProblem(what, items, fix, limit=8) -> str:
        shown = "; ".join(items[:limit]) + (f"; and {len(items) - limit} more" if len(items) > limit else "")
        return f"{what}: {shown}. {fix}"

    def datasetPreview(self, csvPath=None, normalFolder=None, abnormalFolder=None, outputFolder=None, spatialDims=None, seed: int = 0) -> dict:
        """Check a cohort before training; nothing is trained and no node is made.

        Either ``csvPath`` (a cohort CSV: ``path,label[,mask,subtype,split]``, label 0 = normal, 1 = abnormal) or
        ``normalFolder`` + ``abnormalFolder`` (image files found recursively; a cohort CSV listing them is
        written as ``<outputFolder>/cohort.csv``, or into a new temporary folder when no output folder is
        given). Every image (and mask) header is read with SimpleITK; with ``spatialDims`` the dimensions are
        checked against the model too.

        Returns {"counts": {"normal", "abnormal"}, "splits": {split: {"normal", "abnormal"}} (the CSV's split
        column, or the split training will make), "splitSource": "csv" | "automatic", "problems": [messages
        that say what to do], "unreadable": [paths], "csv": the cohort CSV path or None}.
        """
        from CounterfactualVALib.cohort import read_cohort_csv, stratified_split, write_cohort_csv
        from CounterfactualVALib.imageio import InputError

        preview = {"counts": {"normal": 0, "abnormal": 0}, "splits": {}, "splitSource": None, "problems": [], "unreadable": [], "csv": None}
        problems = preview["problems"]
        folders = normalFolder is not None or abnormalFolder is not None
        if folders and csvPath:
            raise ValueError("Give either a cohort CSV or the two folders (normal and abnormal), not both.")
        if folders:
            rows = []
            for label, folder, kind in ((0, normalFolder, "normal"), (1, abnormalFolder, "abnormal")):
                folder = str(folder or "")
                if not folder:
                    problems.append(f"No {kind} folder was given. Select the folder that holds the {kind} scans.")
                    continue
                if not os.path.isdir(folder):
                    problems.append(f"The {kind} folder {folder} does not exist. Check the path.")
                    continue
                files = self._imageFiles(folder)
                if not files:
                    problems.append(
                        f"The {kind} folder {folder} holds no image files ({', '.join(IMAGE_EXTENSIONS)}). "
                        "Select the folder that holds the scans (subfolders are searched too)."
                    )
                rows += [{"path": os.path.abspath(f), "label": label} for f in files]
            if normalFolder and abnormalFolder and os.path.abspath(str(normalFolder)) == os.path.abspath(str(abnormalFolder)):
                problems.append("The normal and abnormal folders are the same folder. Put each class in its own folder.")
            if rows:
                target = outputFolder or tempfile.mkdtemp(prefix="CounterfactualVATraining-")
                preview["csv"] = str(write_cohort_csv(os.path.join(str(target), COHORT_CSV_NAME), rows))
            records = [{**r, "mask": None, "subtype": "", "split": ""} for r in rows]
        else:
            if not csvPath:
                raise ValueError("No data: give a cohort CSV (csvPath) or a normal and an abnormal folder.")
            preview["csv"] = str(csvPath)
            try:
                records = read_cohort_csv(csvPath, check_files=False, require_both_classes=False)
            except InputError as exc:
                problems.append(str(exc))
                return preview

        counts = preview["counts"]
        counts["normal"] = sum(1 for r in records if r["label"] == 0)
        counts["abnormal"] = sum(1 for r in records if r["label"] == 1)
        if records and not (counts["normal"] and counts["abnormal"]):
            have, lack = ("normal", "abnormal") if counts["normal"] else ("abnormal", "normal")
            where = f"put {lack} scans in the {lack} folder" if folders else f"add {lack} images (label {1 if lack == 'abnormal' else 0}) to the CSV, or check its label column"
            problems.append(
                f"Only {have} images were found ({counts['normal']} normal, {counts['abnormal']} abnormal). A counterfactual "
                f"model needs both classes: {where}."
            )

        # Every file's header.
        unreadable, wrongShape = [], []
        for record in records:
            for kind, path in (("image", record["path"]), ("mask", record.get("mask"))):
                if not path:
                    continue
                try:
                    dim, size, components = self._readHeader(path)
                except ValueError as exc:
                    unreadable.append((path, f"{os.path.basename(path)} ({kind}: {exc})"))
                    continue
                if kind == "image" and components != 1:
                    wrongShape.append(f"{os.path.basename(path)} ({components} components per voxel; models take one scalar channel)")
                elif kind == "image" and spatialDims is not None:
                    if spatialDims == 2 and dim == 3 and 1 not in size:
                        wrongShape.append(f"{os.path.basename(path)} (a 3D volume of size {list(size)} for a 2D model)")
                    elif spatialDims == 3 and dim != 3:
                        wrongShape.append(f"{os.path.basename(path)} ({dim}D, size {list(size)}, for a 3D model)")
        if unreadable:
            preview["unreadable"] = [p for p, _ in unreadable]
            fix = "Fix or remove these files (or their rows in the CSV), then check again."
            if not folders:
                fix += " Paths in the CSV are taken relative to the CSV's folder."
            problems.append(self._listProblem(f"{len(unreadable)} file(s) cannot be read", [text for _, text in unreadable], fix))
        if wrongShape:
            problems.append(self._listProblem(
                f"{len(wrongShape)} image(s) do not fit the model", wrongShape,
                "Choose the matching spatial dimensions (2 for 2D images, 3 for volumes), or convert the images.",
            ))

        # The split training will use (CounterfactualVATrainingLib.data.load_cohort: a CSV without a complete
        # split column is split here, stratified by label and subtype, 20% validation, no test).
        if records:
            splits = [r.get("split") or "" for r in records]
            preview["splitSource"] = "csv"
            if not all(splits):
                strata = [f"{r['label']}:{r.get('subtype') or ''}" for r in records]
                splits = stratified_split(strata, test_fraction=0.0, val_fraction=0.2, seed=seed)
                preview["splitSource"] = "automatic"
            for record, split in zip(records, splits):
                entry = preview["splits"].setdefault(split, {"normal": 0, "abnormal": 0})
                entry["normal" if record["label"] == 0 else "abnormal"] += 1
            train = preview["splits"].get("train", {"normal": 0, "abnormal": 0})
            if counts["normal"] and counts["abnormal"] and not (train["normal"] and train["abnormal"]):
                problems.append(
                    f"The training split has {train['normal']} normal and {train['abnormal']} abnormal images; both classes are "
                    "needed. Add images, or change the CSV's split column (train/val/test)."
                )
        elif not problems:
            problems.append("The data lists no images. Add images (one row per image in the CSV, or files in the folders).")
        return preview

    @staticmethod
    def describePreview(preview: dict) -> str:
        """A short human-readable summary of datasetPreview()'s result (for the panel)."""
        counts = preview["counts"]
        text = f"{counts['normal']} normal, {counts['abnormal']} abnormal images"
        if preview.get("splits"):
            parts = [f"{name} {c['normal']}+{c['abnormal']}" for name, c in sorted(preview["splits"].items())]
            text += f"; split ({preview.get('splitSource')}): " + ", ".join(parts)
        if preview.get("csv"):
            text += f"; cohort CSV: {preview['csv']}"
        if preview["problems"]:
            text += ".\nProblems:\n- " + "\n- ".join(preview["problems"])
        else:
            text += ". Ready to train."
        return text


class TrainingLogMixin:
    """The run's table node (``<run> training log``) and plot chart (``<run> training losses``); the logic
    provides ``self.scene``."""


    def logNodes(self, outputFolder, create: bool = True):
        """(table node, plot chart node) of the run in ``outputFolder`` (found by the folder, so a resumed run
        keeps its nodes; new ones named ``<run> training log`` / ``<run> training losses``); (None, None) without
        a scene."""
        scene = self.scene
        if scene is None:
            return None, None
        folder = os.path.abspath(str(outputFolder))
        run = os.path.basename(folder.rstrip(os.sep)) or "training"
        table = None
        for i in range(scene.GetNumberOfNodesByClass("vtkMRMLTableNode")):
            node = scene.GetNthNodeByClass(i, "vtkMRMLTableNode")
            if node.GetAttribute(RUN_FOLDER_ATTRIBUTE) == folder:
                table = node
                break
        if table is None:
            if not create:
                return None, None
            table = scene.AddNewNodeByClass("vtkMRMLTableNode", f"{run} training log")
            table.SetAttribute(RUN_FOLDER_ATTRIBUTE, folder)
            table.SetDescription(f"Training log of {folder} ({LOG_NAME}: one row per logged step).")
        chartID = table.GetAttribute("CounterfactualVATraining.ChartNodeID")
        chart = scene.GetNodeByID(chartID) if chartID else None
        if chart is None and create:
            chart = scene.AddNewNodeByClass("vtkMRMLPlotChartNode", f"{run} training losses")
            chart.SetTitle(f"{run}: training losses")
            chart.SetXAxisTitle("step")
            chart.SetYAxisTitle("loss")
            chart.SetAttribute(RUN_FOLDER_ATTRIBUTE, folder)
            table.SetAttribute("CounterfactualVATraining.ChartNodeID", chart.GetID())
        return table, chart

    def prepareLog(self, outputFolder, resume: bool) -> tuple:
        """The run's (table, chart) nodes before its process starts: a resumed run continues them; a new run in a
        folder that held one starts empty, and the old run's files go to a replaced-<time> subfolder (never
        deleted), so the table shows only the new run's rows and the command line finds no run to refuse."""
        if not resume:
            from CounterfactualVATrainingLib.runfolder import move_run_aside

            move_run_aside(outputFolder)
        table, chart = self.logNodes(outputFolder)
        if table is not None and not resume:
            self._clearLogNodes(table, chart)
        return table, chart

    @staticmethod
    def readLogCsv(logPath) -> tuple:
        """(column names, rows as lists of floats; NaN where a row has no value, e.g. val_* between validations)."""
        import csv

        with open(logPath, newline="", encoding="utf-8") as f:
            reader = csv.reader(f)
            header = next(reader, [])
            rows = []
            for raw in reader:
                if not raw:
                    continue
                row = []
                for i in range(len(header)):
                    text = raw[i].strip() if i < len(raw) else ""
                    try:
                        row.append(float(text) if text else math.nan)
                    except ValueError:
                        row.append(math.nan)
                rows.append(row)
        return header, rows

    def updateLogTable(self, tableNode, logPath) -> int:
        """Replace the table's contents with log.csv (step as integers, the rest as doubles). Returns the rows."""
        header, rows = self.readLogCsv(logPath)
        table = vtk.vtkTable()
        for i, name in enumerate(header):
            array = vtk.vtkIntArray() if name == "step" else vtk.vtkDoubleArray()
            array.SetName(name)
            array.SetNumberOfTuples(len(rows))
            for r, row in enumerate(rows):
                value = row[i]
                array.SetValue(r, int(value) if name == "step" and value == value else (0 if name == "step" else value))
            table.AddColumn(array)
        tableNode.SetAndObserveTable(table)
        tableNode.Modified()
        return len(rows)

    def updateLossChart(self, chartNode, tableNode) -> list:
        """One line series per ``loss*`` column of the table (x = step); new columns get new series."""
        scene = chartNode.GetScene()
        run = tableNode.GetAttribute(RUN_FOLDER_ATTRIBUTE) or ""
        runName = os.path.basename(run.rstrip(os.sep)) or tableNode.GetName()
        existing = {}
        for i in range(chartNode.GetNumberOfPlotSeriesNodes()):
            series = chartNode.GetNthPlotSeriesNode(i)
            if series is not None:
                existing[series.GetYColumnName()] = series
        columns = [tableNode.GetColumnName(i) for i in range(tableNode.GetNumberOfColumns())]
        for column in columns:
            if not column.startswith("loss") or column in existing:
                continue
            series = scene.AddNewNodeByClass("vtkMRMLPlotSeriesNode", f"{runName} {column}")
            series.SetAndObserveTableNodeID(tableNode.GetID())
            series.SetXColumnName("step")
            series.SetYColumnName(column)
            series.SetPlotType(slicer.vtkMRMLPlotSeriesNode.PlotTypeScatter)
            series.SetMarkerStyle(slicer.vtkMRMLPlotSeriesNode.MarkerStyleNone)
            series.SetLineStyle(slicer.vtkMRMLPlotSeriesNode.LineStyleSolid)
            series.SetColor(*SERIES_COLORS[len(existing) % len(SERIES_COLORS)])
            chartNode.AddAndObservePlotSeriesNodeID(series.GetID())
            existing[column] = series
        return [existing[c] for c in columns if c in existing]

    @staticmethod
    def _clearLogNodes(table, chart):
        table.SetAndObserveTable(vtk.vtkTable())
        table.RemoveAttribute(MODEL_PATH_ATTRIBUTE)
        if chart is not None:
            scene = chart.GetScene()
            ids = [chart.GetNthPlotSeriesNodeID(i) for i in range(chart.GetNumberOfPlotSeriesNodes())]
            chart.RemoveAllPlotSeriesNodeIDs()
            for nodeID in ids:
                node = scene.GetNodeByID(nodeID) if nodeID else None
                if node is not None:
                    scene.RemoveNode(node)
