"""Cohort folders: writing images, the cohort CSV and the stratified split.

A cohort folder holds images (and optionally ground-truth masks or difference maps) plus one CSV::

    path,label,mask,subtype,split
    images/img_00000.nii.gz,0,masks/mask_00000.nii.gz,control,train
    images/img_00001.nii.gz,1,masks/mask_00001.nii.gz,A,test

``path`` and ``mask`` are relative to the CSV's folder (absolute paths are accepted when reading); ``label`` is
0 (normal) or 1 (abnormal); ``mask`` may be empty; ``subtype`` is free text; ``split`` is ``train``, ``val``,
``test`` or empty. Generators write the CSV last, so a folder whose generation was interrupted has no CSV and
cannot be mistaken for a complete cohort.
"""

from __future__ import annotations

import csv
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from . import imageio
from .atomic import atomic_path
from .imageio import InputError

CSV_COLUMNS = ("path", "label", "mask", "subtype", "split")
REQUIRED_COLUMNS = ("path", "label")
SPLITS = ("train", "val", "test")


def write_image(
    array: np.ndarray,
    path: str | os.PathLike,
    spacing: Sequence[float] | None = None,
    origin: Sequence[float] | None = None,
    direction: Sequence[float] | None = None,
    compress: bool = True,
) -> Path:
    """Write a numpy array (numpy order: ``(z, y, x)`` or ``(y, x)``) as an image with the given geometry.

    ``spacing`` and ``origin`` are in SimpleITK (x, y, z) order, ``direction`` is the flattened row-major
    direction matrix (LPS physical space); any of them left as ``None`` defaults to 1 mm, 0 and identity. The
    file is written under a temporary name and renamed, so no reader ever sees half a file.
    """
    array = np.asarray(array)
    if array.ndim not in (2, 3):
        raise ValueError(f"write_image takes a 2D or 3D array, got shape {array.shape}.")
    if array.dtype == np.float64:
        array = array.astype(np.float32)
    elif array.dtype == bool:
        array = array.astype(np.uint8)
    image = sitk.GetImageFromArray(np.ascontiguousarray(array))
    dim = array.ndim
    image.SetSpacing(tuple(float(s) for s in spacing) if spacing is not None else (1.0,) * dim)
    image.SetOrigin(tuple(float(o) for o in origin) if origin is not None else (0.0,) * dim)
    image.SetDirection(tuple(float(d) for d in direction) if direction is not None else tuple(np.eye(dim).ravel()))
    return imageio.write_image(image, path, compress)


def _round_half_up(x: float) -> int:
    return int(np.floor(x + 0.5))


def stratified_split(strata: Sequence[str], test_fraction: float = 0.2, val_fraction: float = 0.2, seed: int = 0) -> list[str]:
    """Assign ``"train"``/``"val"``/``"test"`` to each item, stratum by stratum.

    In every stratum (e.g. ``control``/``A``/``B``), ``round(test_fraction * n)`` randomly chosen items go to
    ``test``, then ``round(val_fraction * rest)`` of the rest to ``val``; the others are ``train``. Deterministic
    for a given ``seed`` and list of strata (strata are visited in sorted order).
    """
    for name, value in (("test_fraction", test_fraction), ("val_fraction", val_fraction)):
        if not 0.0 <= float(value) < 1.0:
            raise ValueError(f"{name} must be in [0, 1), got {value}.")
    strata = [str(s) for s in strata]
    rng = np.random.default_rng(seed)
    splits = ["train"] * len(strata)
    for stratum in sorted(set(strata)):
        members = np.array([i for i, s in enumerate(strata) if s == stratum])
        members = members[rng.permutation(len(members))]
        n_test = _round_half_up(test_fraction * len(members))
        n_val = _round_half_up(val_fraction * (len(members) - n_test))
        for i in members[:n_test]:
            splits[i] = "test"
        for i in members[n_test : n_test + n_val]:
            splits[i] = "val"
    return splits


def _relative(path: str | os.PathLike, folder: Path) -> str:
    path = Path(path)
    try:
        return path.resolve().relative_to(folder.resolve()).as_posix()
    except ValueError:
        return str(path.resolve())


def write_cohort_csv(csv_path: str | os.PathLike, rows: Sequence[dict]) -> Path:
    """Write the cohort CSV atomically; image/mask paths are stored relative to the CSV's folder when inside it.

    Each row is a dict with ``path``, ``label`` and optionally ``mask``, ``subtype``, ``split``.
    """
    csv_path = Path(csv_path)
    folder = csv_path.parent
    with atomic_path(csv_path, suffix=".csv") as tmp:
        with open(tmp, "w", newline="", encoding="utf-8") as f:
            writer = csv.writer(f)
            writer.writerow(CSV_COLUMNS)
            for row in rows:
                mask = row.get("mask") or ""
                writer.writerow(
                    [
                        _relative(row["path"], folder) if os.path.isabs(row["path"]) else Path(row["path"]).as_posix(),
                        int(row["label"]),
                        (_relative(mask, folder) if os.path.isabs(mask) else Path(mask).as_posix()) if mask else "",
                        row.get("subtype", "") or "",
                        row.get("split", "") or "",
                    ]
                )
    return csv_path


def read_cohort_csv(csv_path: str | os.PathLike, check_files: bool = True, require_both_classes: bool = True) -> list[dict]:
    """Read a cohort CSV into a list of dicts with absolute ``path``/``mask`` (``mask`` is ``None`` when empty),
    integer ``label``, and ``subtype``/``split`` strings (empty when the column is absent).

    Raises :class:`~CounterfactualVALib.imageio.InputError` (a ``ValueError``) naming the problem and its fix for:
    a missing CSV or referenced file, missing ``path``/``label`` columns, labels other than 0/1, unknown split
    names, an empty cohort, and a cohort with only one class (training needs both).
    """
    csv_path = Path(csv_path)
    if not csv_path.is_file():
        raise InputError(
            f"Cohort CSV not found: {csv_path}. Pass the cohort.csv written by the data generator, or a CSV with "
            f"columns {','.join(CSV_COLUMNS)} (paths relative to the CSV's folder)."
        )
    folder = csv_path.resolve().parent
    with open(csv_path, newline="", encoding="utf-8-sig") as f:
        reader = csv.DictReader(f)
        columns = [c.strip() for c in (reader.fieldnames or [])]
        missing = [c for c in REQUIRED_COLUMNS if c not in columns]
        if missing:
            raise InputError(
                f"{csv_path} lacks the column(s) {', '.join(missing)} (found: {', '.join(columns) or 'no header'}). "
                f"The first line must be a header such as '{','.join(CSV_COLUMNS)}'; 'path' and 'label' are required."
            )
        raw_rows = [{(k or "").strip(): (v or "").strip() for k, v in row.items()} for row in reader]
    rows = []
    for line, raw in enumerate(raw_rows, start=2):
        if not raw.get("path"):
            if not any(raw.values()):
                continue  # blank line
            raise InputError(f"{csv_path}, line {line}: the 'path' column is empty. Give every row an image path.")
        label_text = raw.get("label", "")
        try:
            label = int(float(label_text))
            if float(label_text) != label:
                raise ValueError
        except ValueError:
            label = None
        if label not in (0, 1):
            raise InputError(
                f"{csv_path}, line {line}: label '{label_text}' is not 0 or 1. Use 0 for the normal class and 1 for the "
                "abnormal class (subgroups go in the 'subtype' column)."
            )
        split = raw.get("split", "")
        if split and split not in SPLITS:
            raise InputError(
                f"{csv_path}, line {line}: split '{split}' is not one of {', '.join(SPLITS)}. Fix it or leave it empty."
            )
        path = Path(raw["path"])
        path = path if path.is_absolute() else folder / path
        mask = raw.get("mask", "")
        mask_path = None
        if mask:
            mask_path = Path(mask)
            mask_path = mask_path if mask_path.is_absolute() else folder / mask_path
        if check_files:
            for kind, p in (("image", path), ("mask", mask_path)):
                if p is not None and not p.is_file():
                    raise InputError(
                        f"{csv_path}, line {line}: {kind} file {p} does not exist. Paths are taken relative to the CSV's "
                        "folder: move the CSV back next to its images/ folder, or fix the path."
                    )
        rows.append(
            {
                "path": str(path),
                "label": label,
                "mask": str(mask_path) if mask_path is not None else None,
                "subtype": raw.get("subtype", ""),
                "split": split,
            }
        )
    if not rows:
        raise InputError(f"{csv_path} lists no images. Add one row per image below the header.")
    if require_both_classes:
        labels = {r["label"] for r in rows}
        if len(labels) < 2:
            only = labels.pop()
            raise InputError(
                f"{csv_path}: every image has label {only}, but a counterfactual model needs both classes (0 = normal, "
                f"1 = abnormal). Add images of class {1 - only}, or check the label column."
            )
    return rows
