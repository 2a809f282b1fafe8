"""The synthetic two-subtype data set of VA-GAN (Baumgartner et al. 2018), reused by ICAM and VANT-GAN.

Recipe (side ``S`` = ``size``; numbers quoted for S = 128):

* half the images are controls (label 0); the other half are patients (label 1), split equally into subtype
  ``A`` and ``B``;
* background: iid N(0, 50^2) noise, Gaussian blur sigma 2.5 (``mode="nearest"``), rescaled so that each
  image's background has standard deviation exactly 50;
* effect: +100 inside two boxes of half-width 10 (20 px side; 20^3 cubes in 3D). Both subtypes have a box at
  the centre; the second box sits at centre + (o, o[, o]) for A and centre - (o, o[, o]) for B, with
  o = int(S / 3.5 + 0.5) (37 at S = 128). Both boxes of an image move by the same integer jitter per axis,
  drawn uniformly from [-5, 4]. In numpy (row, column[, ...]) index order, "+" means towards larger indices:
  A's second box is at the bottom right of a displayed array, B's at the top left.
  ``shape="circle"`` uses discs (balls in 3D) of radius 10 centred where the boxes are (VANT-GAN's wording);
* ground truth: the boxes (or discs) as a uint8 0/1 mask; all zero for controls;
* each image is then min-max mapped to [-1, 1] (float32).

Small images (``size < 128``, so that tests can use 32 x 32) keep the layout proportional: half-width
``max(2, round(10 * S / 128))``, jitter ``[-j, j - 1]`` with ``j = max(1, round(5 * S / 128))``, the offset
formula above (already proportional), and blur sigma ``2.5 * min(1, S / 64)`` (2.5 from S = 64 up, so the
texture stays 2.5 px for all the sizes used in the papers). At ``size >= 128`` the recipe is exactly as quoted.
The 3D version (no public generator exists) applies the same recipe along every axis.
"""

from __future__ import annotations

import json
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
from scipy.ndimage import gaussian_filter

from CounterfactualVALib.cohort import stratified_split, write_cohort_csv, write_image

BACKGROUND_STD = 50.0
EFFECT_INTENSITY = 100.0
SUBTYPES = ("control", "A", "B")
_FILE_EXTENSIONS = (".nii.gz", ".nii", ".nrrd", ".mha")
_CHUNK_VOXELS = 4_000_000  # voxels generated per batch: about 16 MB of float32


def _round_half_up(x: float) -> int:
    return int(np.floor(x + 0.5))


def synthetic_layout(size: int) -> dict:
    """The geometry of the effect for images of side ``size``: half-width, offset, jitter range, blur sigma."""
    size = int(size)
    if size >= 128:
        half_width, jitter = 10, 5
    else:
        half_width = max(2, _round_half_up(10 * size / 128))
        jitter = max(1, _round_half_up(5 * size / 128))
    return {
        "centre": size // 2,
        "half_width": half_width,
        "offset": int(size / 3.5 + 0.5),
        "jitter_low": -jitter,
        "jitter_high": jitter - 1,
        "blur_sigma": 2.5 * min(1.0, size / 64),
    }


def _effect_mask(centres: list[np.ndarray], size: int, spatial_dims: int, half_width: int, shape: str) -> np.ndarray:
    mask = np.zeros((size,) * spatial_dims, dtype=np.uint8)
    for c in centres:
        lo = np.clip(c - half_width, 0, size)
        hi = np.clip(c + half_width, 0, size)
        window = tuple(slice(int(a), int(b)) for a, b in zip(lo, hi))
        if shape == "box":
            mask[window] = 1
        else:
            # disc/ball of radius half_width around the box's geometric centre (c - 0.5 in index units)
            grids = np.ogrid[window]
            dist2 = sum((g - (ci - 0.5)) ** 2 for g, ci in zip(grids, c))
            mask[window] |= (dist2 <= half_width**2).astype(np.uint8)
    return mask


def make_synthetic_batch(
    subtypes: list[str], size: int, spatial_dims: int, rng: np.random.Generator, shape: str = "box"
) -> tuple[np.ndarray, np.ndarray]:
    """Raw (unmapped) images and masks for the given subtypes: background std 50, effect +100.

    Returns ``(images, masks)`` of shape ``(len(subtypes),) + (size,) * spatial_dims``; images are in
    intensity units (not yet mapped to [-1, 1]), float32; masks uint8.
    """
    layout = synthetic_layout(size)
    batch = len(subtypes)
    spatial = (size,) * spatial_dims
    noise = rng.standard_normal((batch,) + spatial, dtype=np.float32)
    noise *= np.float32(BACKGROUND_STD)
    background = gaussian_filter(noise, sigma=(0.0,) + (layout["blur_sigma"],) * spatial_dims, mode="nearest")
    axes = tuple(range(1, spatial_dims + 1))
    scale = BACKGROUND_STD / background.std(axis=axes, dtype=np.float64)
    background *= scale.astype(np.float32).reshape((batch,) + (1,) * spatial_dims)
    # jitter drawn for every image (controls too) so that the random stream does not depend on the labels
    jitters = rng.integers(layout["jitter_low"], layout["jitter_high"] + 1, size=(batch, spatial_dims))
    masks = np.zeros((batch,) + spatial, dtype=np.uint8)
    centre = np.full(spatial_dims, layout["centre"])
    for i, subtype in enumerate(subtypes):
        if subtype == "control":
            continue
        sign = 1 if subtype == "A" else -1
        first = centre + jitters[i]
        second = first + sign * layout["offset"]
        masks[i] = _effect_mask([first, second], size, spatial_dims, layout["half_width"], shape)
    images = background + np.float32(EFFECT_INTENSITY) * masks
    return images, masks


def map_to_unit_range(images: np.ndarray) -> np.ndarray:
    """Min-max map each image of a batch (first axis) to [-1, 1], as float32."""
    axes = tuple(range(1, images.ndim))
    lo = images.min(axis=axes, keepdims=True).astype(np.float64)
    hi = images.max(axis=axes, keepdims=True).astype(np.float64)
    scale = (2.0 / np.maximum(hi - lo, 1e-12)).astype(np.float32)
    out = (images - lo.astype(np.float32)) * scale - np.float32(1.0)
    return np.clip(out, -1.0, 1.0).astype(np.float32, copy=False)


def generate_synthetic(
    out_dir: str | os.PathLike,
    n: int = 10000,
    size: int = 128,
    spatial_dims: int = 2,
    seed: int = 0,
    shape: str = "box",
    test_fraction: float = 0.2,
    val_fraction: float = 0.2,
    file_ext: str = ".nii.gz",
) -> Path:
    """Write the VA-GAN synthetic cohort (module docstring) into ``out_dir`` and return its CSV path.

    Layout: ``images/img_00000<ext>`` (float32 in [-1, 1]), ``masks/mask_00000<ext>`` (uint8, one for every
    image, all zero for controls), ``synthetic_parameters.json`` and ``cohort.csv`` (columns
    ``path,label,mask,subtype,split``; subtype ``control``/``A``/``B``; paths relative to ``out_dir``). Images
    have 1 mm spacing, zero origin and identity direction (2D images are written as 2D images). ``n // 2``
    images are controls, the rest patients split equally between A and B, in random order. The split is
    stratified by subtype: ``test_fraction`` of each subtype is ``test``, ``val_fraction`` of the rest ``val``.
    Everything is deterministic given ``seed``. The CSV is written last (any old one is removed first).
    """
    n, size, spatial_dims = int(n), int(size), int(spatial_dims)
    if spatial_dims not in (2, 3):
        raise ValueError(f"spatial_dims must be 2 or 3, got {spatial_dims}.")
    if shape not in ("box", "circle"):
        raise ValueError(f"shape must be 'box' or 'circle', got {shape!r}.")
    if size < 16:
        raise ValueError(f"size must be at least 16 so that both effect regions fit in the image, got {size}.")
    if n < 4:
        raise ValueError(f"n must be at least 4 (controls and both patient subtypes), got {n}.")
    if file_ext not in _FILE_EXTENSIONS:
        raise ValueError(f"file_ext must be one of {', '.join(_FILE_EXTENSIONS)}, got {file_ext!r}.")

    out_dir = Path(out_dir)
    (out_dir / "images").mkdir(parents=True, exist_ok=True)
    (out_dir / "masks").mkdir(parents=True, exist_ok=True)
    csv_path = out_dir / "cohort.csv"
    if csv_path.exists():
        csv_path.unlink()  # a half-regenerated folder must not look complete

    rng = np.random.default_rng(seed)
    n_controls = n // 2
    n_a = (n - n_controls) // 2
    subtypes = np.array(["control"] * n_controls + ["A"] * n_a + ["B"] * (n - n_controls - n_a))
    subtypes = subtypes[rng.permutation(n)].tolist()
    splits = stratified_split(subtypes, test_fraction, val_fraction, seed)

    width = max(5, len(str(n - 1)))
    names = [f"{i:0{width}d}{file_ext}" for i in range(n)]
    compress = file_ext != ".nii"
    geometry = {"spacing": (1.0,) * spatial_dims, "origin": (0.0,) * spatial_dims}

    def write_pair(i: int, image: np.ndarray, mask: np.ndarray) -> None:
        write_image(image, out_dir / "images" / f"img_{names[i]}", compress=compress, **geometry)
        write_image(mask, out_dir / "masks" / f"mask_{names[i]}", compress=compress, **geometry)

    chunk = max(1, _CHUNK_VOXELS // size**spatial_dims)
    workers = max(2, min(4, os.cpu_count() or 1))
    with ThreadPoolExecutor(max_workers=workers) as pool:
        pending = []
        for start in range(0, n, chunk):
            stop = min(n, start + chunk)
            raw, masks = make_synthetic_batch(subtypes[start:stop], size, spatial_dims, rng, shape)
            images = map_to_unit_range(raw)
            for f in pending:  # at most one batch waits to be written while the next is generated
                f.result()
            pending = [pool.submit(write_pair, start + k, images[k], masks[k]) for k in range(stop - start)]
        for f in pending:
            f.result()

    parameters = {
        "generator": "generate_synthetic",
        "n": n,
        "size": size,
        "spatial_dims": spatial_dims,
        "seed": seed,
        "shape": shape,
        "test_fraction": test_fraction,
        "val_fraction": val_fraction,
        "file_ext": file_ext,
        "background_std": BACKGROUND_STD,
        "effect_intensity": EFFECT_INTENSITY,
        "counts": {s: subtypes.count(s) for s in SUBTYPES},
        **synthetic_layout(size),
    }
    (out_dir / "synthetic_parameters.json").write_text(json.dumps(parameters, indent=2) + "\n", encoding="utf-8")

    rows = [
        {
            "path": f"images/img_{names[i]}",
            "label": 0 if subtypes[i] == "control" else 1,
            "mask": f"masks/mask_{names[i]}",
            "subtype": subtypes[i],
            "split": splits[i],
        }
        for i in range(n)
    ]
    return write_cohort_csv(csv_path, rows)
