"""A realistic 3D phantom cohort built from the real MNI152 2009a template, with a known local atrophy.

The template (T1 plus grey/white-matter probability maps) ships inside nilearn's wheel
(``nilearn/datasets/data/mni_icbm152_*_tal_nlin_sym_09a_converted.nii.gz``); it is read from there with
SimpleITK, nothing is downloaded. Subjects keep the template's physical geometry (LPS origin/direction).

Per subject, in this order:

1. the template T1, resampled to ``spacing_mm`` (linear, after an anti-aliasing blur of FWHM equal to the
   new spacing) on the same field of view;
2. abnormal subjects only: the atrophy, applied in template space (see below);
3. a smooth random deformation: a Gaussian random field per axis (Gaussian bumps on a 20 mm grid), scaled so
   that the largest displacement is ``deformation_mm``, applied with linear interpolation;
4. a smooth multiplicative bias field ``1 + bias_strength * f`` with ``f`` a Gaussian random field (60 mm)
   scaled to ``max |f| = 1``;
5. additive Gaussian noise of standard deviation ``noise_std`` times the 99th intensity percentile of the
   subject's healthy image (same noise for the image and its healthy counterpart);
6. optionally, a rotation by ``oblique_degrees`` about a random axis written into the image direction (the
   origin moves so the volume's centre stays put): the files are oblique, the voxel data are unchanged.

Atrophy (abnormal class, label 1), in template space, with a per-subject, per-region strength drawn from
U(0.7, 1.3) times ``effect_size``:

* ``hippocampus_left``/``hippocampus_right``: grey-matter thinning. Inside a smooth, compactly supported
  ellipsoidal weight ``(1 - r^2)^2`` centred on the hippocampus (MNI (-26, -22, -14) / (26, -22, -14) mm, radii
  9 x 18 x 11 mm) the T1 intensity is lowered by ``strength * weight * P(GM) * T1``;
* ``ventricles``: ventricle enlargement. The lateral ventricles are found as dark (T1 below half the white
  matter's), CSF-probable voxels inside an ellipsoid around MNI (0, -10, 18) mm (radii 30 x 42 x 26 mm, weight
  1 up to half the radius, then tapering smoothly to 0); the tissue in a shell around them (width
  ``max(6 mm, 1.5 * spacing)``, weight falling smoothly from 1 at the ventricle wall to 0) is pulled towards
  the ventricular CSF intensity by ``strength * weight * (T1 - CSF)``, so the ventricles look bigger.

The ground truth is therefore zero outside the regions' ellipsoids (moved by at most ``deformation_mm``).

Intensities never go below 0 (the change is clipped at the local intensity). Every subject is rendered from
the same random state twice, with and without atrophy; the signed difference ``abnormal - healthy`` is the
ground truth (zero outside the deformed regions, exactly), and the healthy render is the counterpart.
"""

from __future__ import annotations

import json
import os
from functools import lru_cache
from pathlib import Path

import numpy as np
import SimpleITK as sitk
from scipy.ndimage import distance_transform_edt, map_coordinates
from scipy.spatial.transform import Rotation

from CounterfactualVALib.cohort import stratified_split, write_cohort_csv, write_image

TEMPLATE_FILES = {
    "t1": "mni_icbm152_t1_tal_nlin_sym_09a_converted.nii.gz",
    "gm": "mni_icbm152_gm_tal_nlin_sym_09a_converted.nii.gz",
    "wm": "mni_icbm152_wm_tal_nlin_sym_09a_converted.nii.gz",
}

# Centres in MNI (RAS) mm; radii along x, y, z in mm: the support of the compact weight.
REGIONS = {
    "hippocampus_left": {"kind": "grey_matter_thinning", "centre_mni_ras": (-26.0, -22.0, -14.0), "radii_mm": (9.0, 18.0, 11.0), "plateau": 0.0},
    "hippocampus_right": {"kind": "grey_matter_thinning", "centre_mni_ras": (26.0, -22.0, -14.0), "radii_mm": (9.0, 18.0, 11.0), "plateau": 0.0},
    "ventricles": {"kind": "ventricle_enlargement", "centre_mni_ras": (0.0, -10.0, 18.0), "radii_mm": (30.0, 42.0, 26.0), "plateau": 0.5},
    # cortical patches (grey-matter thinning of a gyral region): superior parietal and middle frontal cortex
    "cortex_left_parietal": {"kind": "grey_matter_thinning", "centre_mni_ras": (-34.0, -58.0, 48.0), "radii_mm": (16.0, 16.0, 16.0), "plateau": 0.0},
    "cortex_right_frontal": {"kind": "grey_matter_thinning", "centre_mni_ras": (36.0, 30.0, 36.0), "radii_mm": (16.0, 16.0, 16.0), "plateau": 0.0},
}
DEFAULT_REGIONS = ("hippocampus_left", "hippocampus_right", "ventricles")
STRENGTH_RANGE = (0.7, 1.3)
#: the varied recipe (``recipe="varied"``): every atrophy site may occur, sites and strengths vary per
#: subject, and anatomy (deformation, head size), bias and noise vary more and per subject, so that a method
#: cannot win by memorising one pattern (issue 9). Values are ranges drawn uniformly per subject.
VARIED_RECIPE = {
    "regions": tuple(REGIONS),
    "region_probability": 0.8,
    "strength_range": (0.5, 1.5),
    "deformation_mm": (1.0, 4.0),
    "scale_range": (0.94, 1.06),
    "bias_strength": (0.05, 0.25),
    "noise_std": (0.01, 0.04),
}
DEFORMATION_CORRELATION_MM = 20.0
BIAS_CORRELATION_MM = 60.0
VENTRICLE_SHELL_MM = 6.0
_FILE_EXTENSIONS = (".nii.gz", ".nii", ".nrrd", ".mha")


def template_folder() -> Path:
    """nilearn's packaged data folder holding the MNI152 2009a template (no download involved)."""
    try:
        import nilearn
    except ImportError:
        raise ImportError(
            "The phantom cohort is built from the MNI152 template that ships with nilearn: install it with "
            "`pip install nilearn` (or `pip install counterfactualva[phantom]`)."
        ) from None
    folder = Path(os.path.dirname(nilearn.__file__)) / "datasets" / "data"
    missing = [name for name in TEMPLATE_FILES.values() if not (folder / name).is_file()]
    if missing:
        raise FileNotFoundError(
            f"{folder} lacks {', '.join(missing)}: this nilearn installation does not ship the MNI152 template. "
            "Reinstall nilearn from its wheel (`pip install --force-reinstall nilearn`)."
        )
    return folder


def _ras_to_lps(point) -> np.ndarray:
    x, y, z = point
    return np.array([-x, -y, z], dtype=np.float64)


@lru_cache(maxsize=4)
def _load_template(spacing_mm: float) -> dict:
    """T1 and GM/WM probabilities resampled to ``spacing_mm`` on the template's field of view (cached)."""
    folder = template_folder()
    reference = sitk.ReadImage(str(folder / TEMPLATE_FILES["t1"]))
    old_spacing = np.array(reference.GetSpacing())
    old_size = np.array(reference.GetSize())
    direction = np.array(reference.GetDirection()).reshape(3, 3)
    new_spacing = np.full(3, float(spacing_mm))
    new_size = np.maximum(1, np.round(old_size * old_spacing / new_spacing)).astype(int)
    # keep the outer edges of the field of view: voxel centres move by half the change of spacing
    new_origin = np.array(reference.GetOrigin()) + direction @ ((new_spacing - old_spacing) / 2.0)
    arrays = {}
    for key, name in TEMPLATE_FILES.items():
        image = sitk.Cast(sitk.ReadImage(str(folder / name)), sitk.sitkFloat32)
        extra = np.sqrt(np.maximum(new_spacing**2 - old_spacing**2, 0.0))
        if extra.max() > 0:
            image = sitk.SmoothingRecursiveGaussian(image, [float(e / 2.3548) for e in extra])
        image = sitk.Resample(
            image,
            [int(s) for s in new_size],
            sitk.Transform(),
            sitk.sitkLinear,
            [float(o) for o in new_origin],
            [float(s) for s in new_spacing],
            [float(d) for d in direction.ravel()],
            0.0,
            sitk.sitkFloat32,
        )
        array = sitk.GetArrayFromImage(image)
        if key != "t1":
            array = np.clip(array / 255.0, 0.0, 1.0)
        arrays[key] = np.maximum(array, 0.0).astype(np.float32)
    return {
        **arrays,
        "spacing": tuple(float(s) for s in new_spacing),
        "origin": tuple(float(o) for o in new_origin),
        "direction": tuple(float(d) for d in direction.ravel()),
    }


def _physical_grid(shape, spacing, origin, direction) -> np.ndarray:
    """LPS coordinates of every voxel, shape ``(3,) + shape`` in (x, y, z) order; numpy arrays are (z, y, x)."""
    z, y, x = (np.arange(n, dtype=np.float64) for n in shape)
    index = np.stack(np.meshgrid(x * spacing[0], y * spacing[1], z * spacing[2], indexing="ij"), axis=0)
    index = index.transpose(0, 3, 2, 1)  # -> (3, z, y, x)
    d = np.asarray(direction).reshape(3, 3)
    return np.einsum("ij,j...->i...", d, index) + np.asarray(origin).reshape(3, 1, 1, 1)


def _compact_bump(points: np.ndarray, centre_lps: np.ndarray, radii: np.ndarray, plateau: float = 0.0) -> np.ndarray:
    """Smooth, compactly supported weight of the ellipsoidal distance r (points are (3, ...)): 1 up to
    r = plateau, then (1 - t^2)^2 with t = (r - plateau) / (1 - plateau), 0 from r = 1 on."""
    r = np.sqrt(sum(((points[i] - centre_lps[i]) / radii[i]) ** 2 for i in range(3)))
    t = np.clip((r - plateau) / (1.0 - plateau), 0.0, 1.0)
    return (1.0 - t**2) ** 2


@lru_cache(maxsize=8)
def _atrophy_patterns(spacing_mm: float, regions: tuple[str, ...]) -> dict:
    """Per-region intensity change (<= 0) for strength 1 in template space, and region facts for the record."""
    template = _load_template(spacing_mm)
    t1, gm, wm = template["t1"].astype(np.float64), template["gm"], template["wm"]
    points = _physical_grid(t1.shape, template["spacing"], template["origin"], template["direction"])
    patterns, facts = {}, {}
    for name in regions:
        spec = REGIONS[name]
        centre = _ras_to_lps(spec["centre_mni_ras"])
        radii = np.array(spec["radii_mm"])
        weight = _compact_bump(points, centre, radii, spec["plateau"])
        if spec["kind"] == "grey_matter_thinning":
            delta = -weight * gm * t1
            facts[name] = {**spec}
        else:
            csf = np.clip(1.0 - gm - wm, 0.0, 1.0)
            wm_level = float(np.median(t1[wm > 0.9])) if (wm > 0.9).any() else float(t1.max())
            ventricles = (weight > 0) & (csf > 0.5) & (t1 > 0) & (t1 < 0.5 * wm_level)
            if not ventricles.any():
                raise RuntimeError(f"No ventricle voxels found at {spacing_mm} mm spacing; use a finer spacing.")
            csf_level = float(np.median(t1[ventricles]))
            shell_mm = max(VENTRICLE_SHELL_MM, 1.5 * float(spacing_mm))
            distance = distance_transform_edt(~ventricles, sampling=tuple(reversed(template["spacing"])))
            shell = np.where((distance > 0) & (distance < shell_mm), (1.0 - (distance / shell_mm) ** 2) ** 2, 0.0)
            delta = -weight * shell * np.maximum(t1 - csf_level, 0.0)
            facts[name] = {
                **spec,
                "ventricle_voxels": int(ventricles.sum()),
                "csf_intensity": csf_level,
                "shell_mm": shell_mm,
            }
        patterns[name] = delta
    return {"patterns": patterns, "facts": facts}


def _gaussian_random_field(
    rng: np.random.Generator, shape: tuple[int, ...], spacing_mm: float, correlation_mm: float, components: int
) -> np.ndarray:
    """Smooth random field, shape ``(components,) + shape``: random Gaussian bumps of width ``correlation_mm``
    on a grid of the same step (extending one step beyond the volume), summed separably."""
    matrices = []
    for n in shape:
        positions = np.arange(n) * spacing_mm
        nodes = np.arange(-correlation_mm, positions[-1] + 2 * correlation_mm, correlation_mm)
        matrices.append(np.exp(-0.5 * ((positions[:, None] - nodes[None, :]) / correlation_mm) ** 2))
    coarse = rng.standard_normal((components,) + tuple(m.shape[1] for m in matrices))
    return np.einsum("ai,bj,ck,nijk->nabc", *matrices, coarse, optimize=True)


def _oblique_geometry(shape, spacing, origin, direction, axis: np.ndarray, degrees: float):
    """Rotate the image grid about its centre: new origin and direction, same voxels."""
    d = np.asarray(direction).reshape(3, 3)
    half_extent = np.asarray(spacing) * (np.array(tuple(reversed(shape))) - 1) / 2.0
    centre = np.asarray(origin) + d @ half_extent
    rotation = Rotation.from_rotvec(axis * np.deg2rad(degrees)).as_matrix()
    new_direction = rotation @ d
    new_origin = centre - new_direction @ half_extent
    return tuple(float(o) for o in new_origin), tuple(float(v) for v in new_direction.ravel())


def _as_range(name: str, value) -> tuple[float, float]:
    """A number or a (low, high) pair -> (low, high)."""
    if np.ndim(value) == 0:
        return (float(value), float(value))
    low, high = (float(v) for v in value)
    if not low <= high:
        raise ValueError(f"{name}: the range ({low}, {high}) must have low <= high.")
    return (low, high)


def _same(a, b) -> bool:
    return np.array_equal(np.asarray(a, dtype=object), np.asarray(b, dtype=object)) if np.ndim(a) == np.ndim(b) else False


def _render(volume: np.ndarray, coordinates: np.ndarray, bias: np.ndarray) -> np.ndarray:
    warped = map_coordinates(volume, coordinates, order=1, mode="constant", cval=0.0)
    return warped.astype(np.float64) * bias


def generate_phantom_cohort(
    out_dir: str | os.PathLike,
    n_subjects: int = 20,
    abnormal_fraction: float = 0.5,
    spacing_mm: float = 2.0,
    effect_size: float = 0.5,
    regions=DEFAULT_REGIONS,
    deformation_mm: float | tuple[float, float] = 2.0,
    bias_strength: float | tuple[float, float] = 0.15,
    noise_std: float | tuple[float, float] = 0.02,
    seed: int = 0,
    val_fraction: float = 0.2,
    test_fraction: float = 0.2,
    file_ext: str = ".nii.gz",
    oblique_degrees: float = 0.0,
    strength_range: tuple[float, float] = STRENGTH_RANGE,
    region_probability: float = 1.0,
    scale_range: tuple[float, float] = (1.0, 1.0),
    recipe: str | None = None,
) -> Path:
    """Write a 3D phantom cohort (module docstring) into ``out_dir`` and return its CSV path.

    Layout: ``images/sub_000<ext>`` (float32, template intensity units 0-255 plus noise); for abnormal subjects
    ``diffs/diff_000<ext>`` (float32, ``image - healthy counterpart``, <= 0 where the atrophy is) and
    ``counterparts/cf_000<ext>`` (the same subject rendered without atrophy); ``phantom_parameters.json`` (every
    parameter and per-subject draw); ``cohort.csv`` with columns ``path,label,mask,subtype,split`` where
    ``subtype`` is ``control`` or ``atrophy`` and ``mask`` is the diff map (empty for controls). The split is
    stratified by label. ``round(abnormal_fraction * n_subjects)`` subjects, chosen at random, are abnormal.
    Each subject's random draws depend only on ``seed`` and its index. The CSV is written last.

    Variation (defaults reproduce the original fixed recipe exactly): ``deformation_mm``, ``bias_strength`` and
    ``noise_std`` may each be a ``(low, high)`` range drawn uniformly per subject; ``strength_range`` scales
    ``effect_size`` per subject and region; each region is present in an abnormal subject with probability
    ``region_probability`` (at least one always is); ``scale_range`` draws a per-axis head-size scaling about
    the brain's centre (anatomical variation beyond the smooth deformation). ``recipe="varied"`` sets all of
    them to :data:`VARIED_RECIPE` (explicit arguments that differ from the defaults still win).
    """
    if recipe is not None:
        if recipe != "varied":
            raise ValueError(f"recipe must be 'varied' or None, got {recipe!r}.")
        defaults = {"regions": DEFAULT_REGIONS, "region_probability": 1.0, "strength_range": STRENGTH_RANGE,
                    "deformation_mm": 2.0, "scale_range": (1.0, 1.0), "bias_strength": 0.15, "noise_std": 0.02}
        given = {"regions": regions, "region_probability": region_probability, "strength_range": strength_range,
                 "deformation_mm": deformation_mm, "scale_range": scale_range, "bias_strength": bias_strength, "noise_std": noise_std}
        chosen = {k: (VARIED_RECIPE[k] if _same(given[k], defaults[k]) else given[k]) for k in given}
        regions, region_probability, strength_range = chosen["regions"], chosen["region_probability"], chosen["strength_range"]
        deformation_mm, scale_range = chosen["deformation_mm"], chosen["scale_range"]
        bias_strength, noise_std = chosen["bias_strength"], chosen["noise_std"]
    deformation_range = _as_range("deformation_mm", deformation_mm)
    bias_range = _as_range("bias_strength", bias_strength)
    noise_range = _as_range("noise_std", noise_std)
    strength_range = _as_range("strength_range", strength_range)
    scale_range = _as_range("scale_range", scale_range)
    if not 0.0 < float(region_probability) <= 1.0:
        raise ValueError(f"region_probability must be in (0, 1], got {region_probability}.")
    if not 0.5 <= scale_range[0] <= scale_range[1] <= 2.0:
        raise ValueError(f"scale_range must lie within [0.5, 2], got {scale_range}.")
    n_subjects = int(n_subjects)
    regions = tuple(regions)
    unknown = [r for r in regions if r not in REGIONS]
    if unknown:
        raise ValueError(f"Unknown region(s) {', '.join(map(str, unknown))}; choose from {', '.join(REGIONS)}.")
    if not regions:
        raise ValueError(f"regions is empty: name at least one of {', '.join(REGIONS)}.")
    if n_subjects < 1:
        raise ValueError(f"n_subjects must be at least 1, got {n_subjects}.")
    if not 0.0 <= abnormal_fraction <= 1.0:
        raise ValueError(f"abnormal_fraction must be in [0, 1], got {abnormal_fraction}.")
    if not 0.5 <= float(spacing_mm) <= 8.0:
        raise ValueError(f"spacing_mm must be between 0.5 and 8 mm, got {spacing_mm}.")
    for name, value in (("effect_size", effect_size), ("deformation_mm", deformation_range[0]),
                        ("bias_strength", bias_range[0]), ("noise_std", noise_range[0]), ("strength_range", strength_range[0])):
        if not float(value) >= 0.0:
            raise ValueError(f"{name} must be >= 0, got {value}.")
    if bias_range[1] >= 1.0:
        raise ValueError(f"bias_strength must be below 1 (the bias field 1 +/- bias_strength stays positive), got {bias_strength}.")
    if file_ext not in _FILE_EXTENSIONS:
        raise ValueError(f"file_ext must be one of {', '.join(_FILE_EXTENSIONS)}, got {file_ext!r}.")

    spacing_mm = float(spacing_mm)
    out_dir = Path(out_dir)
    for sub in ("images", "diffs", "counterparts"):
        (out_dir / sub).mkdir(parents=True, exist_ok=True)
    csv_path = out_dir / "cohort.csv"
    if csv_path.exists():
        csv_path.unlink()  # a half-regenerated folder must not look complete

    template = _load_template(spacing_mm)
    atrophy = _atrophy_patterns(spacing_mm, regions)
    t1 = template["t1"]
    shape = t1.shape
    spacing_zyx = np.array(tuple(reversed(template["spacing"])))
    grid = np.indices(shape, dtype=np.float32)
    brain_centre = np.array([c.mean() for c in np.nonzero(t1 > 0.1 * t1.max())], dtype=np.float32)  # (z, y, x) voxels

    seed_sequence = np.random.SeedSequence(seed)
    seeds = seed_sequence.spawn(n_subjects + 1)
    # the variation draws come from their own streams, so cohorts of the fixed recipe stay bit-identical
    variation_seeds = seed_sequence.spawn(n_subjects)
    label_rng = np.random.default_rng(seeds[0])
    n_abnormal = int(np.floor(abnormal_fraction * n_subjects + 0.5))
    labels = np.zeros(n_subjects, dtype=int)
    labels[label_rng.permutation(n_subjects)[:n_abnormal]] = 1
    subtypes = ["atrophy" if label else "control" for label in labels]
    splits = stratified_split(subtypes, test_fraction, val_fraction, seed)
    compress = file_ext != ".nii"
    width = max(3, len(str(n_subjects - 1)))

    rows, subjects = [], []
    for i in range(n_subjects):
        rng = np.random.default_rng(seeds[i + 1])
        variation = np.random.default_rng(variation_seeds[i])
        # every draw happens for every subject, in a fixed order, whatever its label and the options
        strengths = rng.uniform(*STRENGTH_RANGE, size=len(regions))
        displacement = _gaussian_random_field(rng, shape, spacing_mm, DEFORMATION_CORRELATION_MM, 3)
        bias = _gaussian_random_field(rng, shape, spacing_mm, BIAS_CORRELATION_MM, 1)[0]
        noise = rng.standard_normal(shape)
        axis = rng.standard_normal(3)
        axis /= np.linalg.norm(axis)
        subject_deformation = variation.uniform(*deformation_range)
        subject_bias = variation.uniform(*bias_range)
        subject_noise = variation.uniform(*noise_range)
        scale = variation.uniform(*scale_range, size=3)
        present = variation.uniform(size=len(regions)) < region_probability
        present[int(variation.integers(len(regions)))] = True  # at least one site per abnormal subject
        if tuple(strength_range) != tuple(STRENGTH_RANGE):
            strengths = variation.uniform(*strength_range, size=len(regions))
        strengths = np.where(present, strengths, 0.0)
        largest = float(np.sqrt((displacement**2).sum(axis=0)).max())
        displacement *= subject_deformation / largest if largest > 0 else 0.0
        bias = 1.0 + subject_bias * bias / max(float(np.abs(bias).max()), 1e-12)

        # displacement components are (z, y, x) in mm along the array axes; sample the template at x + u(x)
        coordinates = grid + (displacement / spacing_zyx.reshape(3, 1, 1, 1)).astype(np.float32)
        if not np.all(scale == 1.0):
            # head size: sample the template at centre + (x - centre) / scale (the subject's brain is `scale` times larger)
            centre = brain_centre.reshape(3, 1, 1, 1)
            coordinates = centre + (coordinates - centre) / scale[::-1].reshape(3, 1, 1, 1).astype(np.float32)
        healthy = _render(t1, coordinates, bias)
        noise_scale = subject_noise * float(np.percentile(healthy, 99))
        healthy_image = (healthy + noise_scale * noise).astype(np.float32)

        origin, direction = template["origin"], template["direction"]
        if oblique_degrees:
            origin, direction = _oblique_geometry(shape, template["spacing"], origin, direction, axis, oblique_degrees)
        geometry = {"spacing": template["spacing"], "origin": origin, "direction": direction, "compress": compress}

        name = f"{i:0{width}d}{file_ext}"
        image_path = f"images/sub_{name}"
        mask_path = ""
        if labels[i]:
            delta = sum(effect_size * s * atrophy["patterns"][r] for s, r in zip(strengths, regions))
            abnormal_t1 = (t1 + np.maximum(delta, -t1.astype(np.float64))).astype(np.float32)
            abnormal = _render(abnormal_t1, coordinates, bias)
            abnormal_image = (abnormal + noise_scale * noise).astype(np.float32)
            difference = abnormal_image - healthy_image
            write_image(abnormal_image, out_dir / image_path, **geometry)
            mask_path = f"diffs/diff_{name}"
            write_image(difference, out_dir / mask_path, **geometry)
            write_image(healthy_image, out_dir / "counterparts" / f"cf_{name}", **geometry)
        else:
            write_image(healthy_image, out_dir / image_path, **geometry)
        rows.append({"path": image_path, "label": int(labels[i]), "mask": mask_path, "subtype": subtypes[i], "split": splits[i]})
        subjects.append(
            {
                "index": i,
                "label": int(labels[i]),
                "subtype": subtypes[i],
                "split": splits[i],
                "image": image_path,
                "diff": mask_path or None,
                "counterpart": f"counterparts/cf_{name}" if labels[i] else None,
                "effect_strength": {r: float(effect_size * s) for r, s in zip(regions, strengths) if s > 0} if labels[i] else None,
                "noise_sigma": noise_scale,
                "deformation_mm": float(subject_deformation),
                "bias_strength": float(subject_bias),
                "noise_std": float(subject_noise),
                "head_scale_xyz": [float(v) for v in scale],
                "oblique_axis": [float(a) for a in axis] if oblique_degrees else None,
                "origin": list(origin),
                "direction": list(direction),
            }
        )

    parameters = {
        "generator": "generate_phantom_cohort",
        "n_subjects": n_subjects,
        "abnormal_fraction": abnormal_fraction,
        "n_abnormal": n_abnormal,
        "spacing_mm": spacing_mm,
        "effect_size": effect_size,
        "regions": list(regions),
        "deformation_mm": deformation_mm,
        "bias_strength": bias_strength,
        "noise_std": noise_std,
        "recipe": recipe,
        "region_probability": region_probability,
        "scale_range": list(scale_range),
        "seed": seed,
        "val_fraction": val_fraction,
        "test_fraction": test_fraction,
        "file_ext": file_ext,
        "oblique_degrees": oblique_degrees,
        "strength_range": list(strength_range),
        "deformation_correlation_mm": DEFORMATION_CORRELATION_MM,
        "bias_correlation_mm": BIAS_CORRELATION_MM,
        "template": {
            "folder": str(template_folder()),
            "files": dict(TEMPLATE_FILES),
            "size_xyz": list(reversed(shape)),
            "spacing": list(template["spacing"]),
            "origin": list(template["origin"]),
            "direction": list(template["direction"]),
        },
        "region_definitions": atrophy["facts"],
        "subjects": subjects,
    }
    (out_dir / "phantom_parameters.json").write_text(json.dumps(parameters, indent=2) + "\n", encoding="utf-8")
    return write_cohort_csv(csv_path, rows)
