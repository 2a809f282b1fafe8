"""Data generation: the VA-GAN synthetic set, the MNI152 phantom cohort and the cohort CSV helpers."""

from __future__ import annotations

import csv
import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
from scipy import ndimage

from CounterfactualVAResearch.data import generate_phantom_cohort, generate_synthetic
from CounterfactualVALib.cohort import read_cohort_csv, stratified_split, write_image
from CounterfactualVAResearch.data.phantom import REGIONS
from CounterfactualVAResearch.data.synthetic import make_synthetic_batch, synthetic_layout


def _array(path):
    return sitk.GetArrayFromImage(sitk.ReadImage(str(path)))


# ---------------------------------------------------------------- synthetic


@pytest.fixture(scope="module")
def synthetic_2d(tmp_path_factory):
    out = tmp_path_factory.mktemp("synthetic2d")
    csv_path = generate_synthetic(out, n=60, size=32, spatial_dims=2, seed=3)
    return csv_path, read_cohort_csv(csv_path)


def test_synthetic_counts_and_stratified_split(synthetic_2d):
    csv_path, rows = synthetic_2d
    assert csv_path.name == "cohort.csv"
    with open(csv_path, newline="") as f:
        assert next(csv.reader(f)) == ["path", "label", "mask", "subtype", "split"]
        relative = list(csv.DictReader(open(csv_path, newline="")))
    assert all(not r["path"].startswith("/") and r["path"].startswith("images/") for r in relative)
    assert Counter(r["label"] for r in rows) == {0: 30, 1: 30}
    assert Counter(r["subtype"] for r in rows) == {"control": 30, "A": 15, "B": 15}
    assert all((r["label"] == 0) == (r["subtype"] == "control") for r in rows)
    per_split = Counter((r["subtype"], r["split"]) for r in rows)
    # test = round(0.2 n), val = round(0.2 (n - test)) in every stratum
    assert per_split[("control", "test")] == 6 and per_split[("control", "val")] == 5
    assert per_split[("A", "test")] == 3 and per_split[("A", "val")] == 2
    assert per_split[("B", "test")] == 3 and per_split[("B", "val")] == 2
    assert per_split[("A", "train")] == per_split[("B", "train")] == 10


def test_synthetic_masks_sit_where_the_recipe_puts_them(synthetic_2d):
    _, rows = synthetic_2d
    layout = synthetic_layout(32)
    side, offset, c = 2 * layout["half_width"], layout["offset"], layout["centre"]
    seen = Counter()
    for row in rows:
        mask = _array(row["mask"])
        image = sitk.ReadImage(row["path"])
        assert image.GetDimension() == 2 and image.GetSpacing() == (1.0, 1.0) and image.GetOrigin() == (0.0, 0.0)
        assert mask.shape == (32, 32) and mask.dtype == np.uint8
        if row["subtype"] == "control":
            assert mask.sum() == 0
            continue
        labelled, count = ndimage.label(mask)
        assert count == 2
        boxes = ndimage.find_objects(labelled)
        assert all(tuple(s.stop - s.start for s in b) == (side, side) for b in boxes)
        assert mask.sum() == 2 * side * side
        starts = sorted(tuple(s.start for s in b) for b in boxes)
        # A: second box at centre + (o, o), i.e. further along both axes; B: at centre - (o, o)
        sign = 1 if row["subtype"] == "A" else -1
        centre_box, other_box = (starts[0], starts[1]) if sign == 1 else (starts[1], starts[0])
        jitter = np.array(centre_box) - (c - layout["half_width"])
        assert np.all(jitter >= layout["jitter_low"]) and np.all(jitter <= layout["jitter_high"])
        assert tuple(np.array(other_box) - np.array(centre_box)) == (sign * offset, sign * offset)
        seen[row["subtype"]] += 1
    assert seen["A"] == seen["B"] == 15


def test_synthetic_intensities(synthetic_2d):
    _, rows = synthetic_2d
    contrasts = []
    for row in rows:
        image = _array(row["path"])
        assert image.dtype == np.float32
        assert image.min() == pytest.approx(-1.0, abs=1e-6) and image.max() == pytest.approx(1.0, abs=1e-6)
        if row["label"] == 1:
            mask = _array(row["mask"]).astype(bool)
            inside, outside = image[mask], image[~mask]
            assert inside.mean() > outside.mean()
            contrasts.append((inside.mean() - outside.mean()) / outside.std())
    # +100 on a background of std 50: about two background standard deviations
    assert 1.6 < np.mean(contrasts) < 2.4


def test_synthetic_raw_background_std_is_50():
    rng = np.random.default_rng(1)
    for size in (32, 128):
        images, masks = make_synthetic_batch(["control", "A", "B"], size, 2, rng)
        background = images - 100.0 * masks
        np.testing.assert_allclose(background.std(axis=(1, 2)), 50.0, rtol=1e-4)
        assert abs(background.mean()) < 25
    assert synthetic_layout(128) == {
        "centre": 64, "half_width": 10, "offset": 37, "jitter_low": -5, "jitter_high": 4, "blur_sigma": 2.5
    }


def test_synthetic_3d_and_circles(tmp_path):
    csv_path = generate_synthetic(tmp_path / "s3", n=6, size=24, spatial_dims=3, seed=0, test_fraction=0.0, val_fraction=0.0)
    rows = read_cohort_csv(csv_path)
    layout = synthetic_layout(24)
    side = 2 * layout["half_width"]
    assert {r["split"] for r in rows} == {"train"}
    for row in rows:
        image = sitk.ReadImage(row["path"])
        assert image.GetDimension() == 3 and image.GetSize() == (24, 24, 24)
        mask = _array(row["mask"])
        if row["label"]:
            labelled, count = ndimage.label(mask)
            assert count == 2 and mask.sum() == 2 * side**3
    circles = generate_synthetic(tmp_path / "c2", n=4, size=32, shape="circle", seed=0, file_ext=".nrrd")
    side = 2 * synthetic_layout(32)["half_width"]
    for row in read_cohort_csv(circles):
        assert row["path"].endswith(".nrrd")
        mask = _array(row["mask"])
        if row["label"]:
            labelled, count = ndimage.label(mask)
            assert count == 2
            # discs fit in the boxes: fewer pixels than the squares, more than the inscribed diamond
            assert 2 * side**2 * 0.5 < mask.sum() < 2 * side**2


def test_synthetic_is_deterministic(tmp_path):
    a = generate_synthetic(tmp_path / "a", n=8, size=32, seed=7)
    b = generate_synthetic(tmp_path / "b", n=8, size=32, seed=7)
    assert a.read_text() == b.read_text()
    np.testing.assert_array_equal(_array(a.parent / "images/img_00005.nii.gz"), _array(b.parent / "images/img_00005.nii.gz"))
    params = json.loads((a.parent / "synthetic_parameters.json").read_text())
    assert params["seed"] == 7 and params["counts"] == {"control": 4, "A": 2, "B": 2}


def test_stratified_split_is_per_stratum_and_deterministic():
    strata = ["x"] * 50 + ["y"] * 10
    splits = stratified_split(strata, 0.2, 0.25, seed=4)
    assert splits == stratified_split(strata, 0.2, 0.25, seed=4)
    assert splits != stratified_split(strata, 0.2, 0.25, seed=5)
    count = Counter(zip(strata, splits))
    assert count[("x", "test")] == 10 and count[("x", "val")] == 10 and count[("x", "train")] == 30
    assert count[("y", "test")] == 2 and count[("y", "val")] == 2 and count[("y", "train")] == 6
    with pytest.raises(ValueError):
        stratified_split(strata, 1.0, 0.0, 0)


# ---------------------------------------------------------------- phantom


@pytest.fixture(scope="module")
def phantom(tmp_path_factory):
    out = tmp_path_factory.mktemp("phantom")
    csv_path = generate_phantom_cohort(out, n_subjects=4, spacing_mm=4.0, seed=2)
    return csv_path, read_cohort_csv(csv_path)


def _points_lps(image: sitk.Image, index_zyx: np.ndarray) -> np.ndarray:
    d = np.array(image.GetDirection()).reshape(3, 3)
    xyz = index_zyx[:, ::-1] * np.array(image.GetSpacing())
    return xyz @ d.T + np.array(image.GetOrigin())


def test_phantom_cohort_layout_and_geometry(phantom):
    csv_path, rows = phantom
    params = json.loads((csv_path.parent / "phantom_parameters.json").read_text())
    assert params["spacing_mm"] == 4.0 and params["n_subjects"] == 4 and len(params["subjects"]) == 4
    assert Counter(r["label"] for r in rows) == {0: 2, 1: 2}
    template = sitk.ReadImage(str(params["template"]["folder"] + "/" + params["template"]["files"]["t1"]))
    for row in rows:
        image = sitk.ReadImage(row["path"])
        assert image.GetPixelID() == sitk.sitkFloat32
        assert image.GetSpacing() == pytest.approx((4.0, 4.0, 4.0))
        assert image.GetDirection() == pytest.approx(template.GetDirection())
        # same field of view as the template: the origin moves by half the change of spacing
        assert np.abs(np.array(image.GetOrigin()) - np.array(template.GetOrigin())).max() <= 2.0
        extent = np.array(image.GetSize()) * 4.0
        np.testing.assert_allclose(extent, np.array(template.GetSize()) * 1.0, atol=4.0)
        if row["label"] == 0:
            assert row["subtype"] == "control" and row["mask"] is None
            name = row["path"].rsplit("sub_", 1)[1]
            assert not (csv_path.parent / "diffs" / f"diff_{name}").exists()
            assert not (csv_path.parent / "counterparts" / f"cf_{name}").exists()
        else:
            assert row["subtype"] == "atrophy"
            diff = sitk.ReadImage(row["mask"])
            for attr in ("GetSize", "GetSpacing", "GetOrigin", "GetDirection"):
                assert getattr(diff, attr)() == getattr(image, attr)()


def test_phantom_ground_truth_is_the_atrophy(phantom):
    csv_path, rows = phantom
    params = json.loads((csv_path.parent / "phantom_parameters.json").read_text())
    margin = params["deformation_mm"] + np.sqrt(3) * params["spacing_mm"]
    for row in (r for r in rows if r["label"] == 1):
        image_sitk = sitk.ReadImage(row["path"])
        image = sitk.GetArrayFromImage(image_sitk)
        diff = _array(row["mask"])
        image_path = Path(row["path"])
        counterpart = _array(image_path.parent.parent / "counterparts" / image_path.name.replace("sub_", "cf_"))
        np.testing.assert_allclose(image - diff, counterpart, atol=1e-4 * float(np.abs(image).max()))
        assert diff.max() <= 1e-4 and diff.min() < -10  # atrophy darkens, clearly
        nonzero = np.argwhere(diff != 0)
        points = _points_lps(image_sitk, nonzero)
        inside_any = np.zeros(len(points), dtype=bool)
        for name in params["regions"]:
            spec = REGIONS[name]
            x, y, z = spec["centre_mni_ras"]
            centre = np.array([-x, -y, z])  # MNI RAS -> LPS
            radii = np.array(spec["radii_mm"]) + margin
            inside = (((points - centre) / radii) ** 2).sum(axis=1) <= 1.0
            assert inside.sum() > 0, f"no effect in {name}"
            inside_any |= inside
        assert inside_any.all(), "the difference map is non-zero outside the atrophy regions"
        # the subject differs from the template (deformation, bias, noise): not a copy of another subject
        assert np.abs(image - counterpart).sum() > 0


def test_phantom_oblique_keeps_the_voxels(tmp_path):
    straight = generate_phantom_cohort(tmp_path / "a", n_subjects=2, spacing_mm=4.0, seed=5, regions=("ventricles",))
    oblique = generate_phantom_cohort(tmp_path / "b", n_subjects=2, spacing_mm=4.0, seed=5, regions=("ventricles",), oblique_degrees=15.0)
    for ra, rb in zip(read_cohort_csv(straight), read_cohort_csv(oblique)):
        a, b = sitk.ReadImage(ra["path"]), sitk.ReadImage(rb["path"])
        np.testing.assert_array_equal(sitk.GetArrayFromImage(a), sitk.GetArrayFromImage(b))
        da, db = np.array(a.GetDirection()).reshape(3, 3), np.array(b.GetDirection()).reshape(3, 3)
        np.testing.assert_allclose(db @ db.T, np.eye(3), atol=1e-6)  # NIfTI stores a float32 quaternion
        rotation = db @ da.T
        angle = np.degrees(np.arccos(np.clip((np.trace(rotation) - 1) / 2, -1, 1)))
        assert angle == pytest.approx(15.0, abs=1e-3)
        centre = lambda im: im.TransformContinuousIndexToPhysicalPoint([(s - 1) / 2 for s in im.GetSize()])
        np.testing.assert_allclose(centre(a), centre(b), atol=1e-3)
    with pytest.raises(ValueError, match="Unknown region"):
        generate_phantom_cohort(tmp_path / "c", n_subjects=2, spacing_mm=4.0, regions=("amygdala",))


# ---------------------------------------------------------------- CSV reader


def _write_csv(path, lines):
    path.write_text("\n".join(lines) + "\n")
    return path


def test_read_cohort_csv_errors(tmp_path):
    for name in ("a.nii.gz", "b.nii.gz"):
        write_image(np.zeros((4, 4), np.float32), tmp_path / name)
    with pytest.raises(ValueError, match="not found"):
        read_cohort_csv(tmp_path / "nothing.csv")
    missing = _write_csv(tmp_path / "missing.csv", ["path,label", "a.nii.gz,0", "gone.nii.gz,1"])
    with pytest.raises(ValueError, match=r"gone\.nii\.gz does not exist"):
        read_cohort_csv(missing)
    one_class = _write_csv(tmp_path / "one.csv", ["path,label", "a.nii.gz,1", "b.nii.gz,1"])
    with pytest.raises(ValueError, match="both classes"):
        read_cohort_csv(one_class)
    assert len(read_cohort_csv(one_class, require_both_classes=False)) == 2
    bad_label = _write_csv(tmp_path / "bad.csv", ["path,label", "a.nii.gz,0", "b.nii.gz,2"])
    with pytest.raises(ValueError, match="not 0 or 1"):
        read_cohort_csv(bad_label)
    no_label = _write_csv(tmp_path / "nolabel.csv", ["path,mask", "a.nii.gz,"])
    with pytest.raises(ValueError, match="label"):
        read_cohort_csv(no_label)
    good = _write_csv(tmp_path / "good.csv", ["path,label,mask", "a.nii.gz,0,", "b.nii.gz,1,a.nii.gz"])
    rows = read_cohort_csv(good)
    assert rows[0]["mask"] is None and rows[1]["mask"] == str(tmp_path.resolve() / "a.nii.gz")
    assert rows[0]["path"] == str(tmp_path.resolve() / "a.nii.gz") and rows[1]["split"] == ""
