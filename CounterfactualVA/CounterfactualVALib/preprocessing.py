"""Preprocessing to a model's grid and its exact inverse.

One resampling takes any input (oblique, anisotropic, any origin) to the model grid: a fixed orientation,
spacing and size, centred on the head (or the image). Intensities are mapped robustly to [-1, 1].
The inverse resamples model-grid maps back onto the input's own grid, so outputs overlay the input voxel
for voxel. Training and inference both call :func:`preprocess` (training through the MONAI transform in
:mod:`CounterfactualVALib.transforms`), and the model file records the :class:`PreprocessingConfig`.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import numpy as np
import SimpleITK as sitk

from .imageio import InputError, validate_image

ORIENTATIONS_3D = ("RAS", "LPS", "LAS", "RPS", "LPI", "RAI")
INTERPOLATIONS = {"linear": sitk.sitkLinear, "bspline": sitk.sitkBSpline, "nearest": sitk.sitkNearestNeighbor}
# The model grid's stated bound: beyond it one float32 volume alone would need more than 512 MiB.
MIN_GRID_SIDE, MAX_GRID_SIDE, MAX_GRID_VOXELS = 2, 1024, 512**3


def _sequence(name: str, value) -> list:
    if isinstance(value, (str, bytes, dict)) or not hasattr(value, "__iter__"):
        raise ValueError(f"{name} must be a list of numbers, got {value!r}")
    return list(value)


def _finite_number(name: str, value) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)) or not np.isfinite(value):
        raise ValueError(f"{name} must hold finite numbers, got {value!r}")
    return float(value)


def _whole_number(name: str, value) -> int:
    number = _finite_number(name, value)
    if number != int(number):
        raise ValueError(f"{name} must hold whole numbers, got {value!r}")
    return int(number)


#: how the model grid is placed, and how intensities are mapped to [-1, 1] (see PreprocessingConfig)
CROPS = ("foreground", "image")
INTENSITIES = ("percentile", "minmax", "none")


@dataclass
class PreprocessingConfig:
    """How a model must be fed; stored in every model file.

    size and spacing are in ITK index order (x, y[, z]). `crop` chooses the centre of the model grid:
    "foreground" centres it on the head's bounding box (3D MRI), "image" on the image's centre (synthetic
    data, already cropped images). `intensity`: "percentile" maps [p_low, p_high] of the foreground to
    [-1, 1] and clips; "minmax" maps [min, max] to [-1, 1]; "none" leaves values as they are.
    """

    spatial_dims: int = 3
    size: tuple[int, ...] = (64, 64, 64)
    spacing: tuple[float, ...] = (3.0, 3.0, 3.0)
    orientation: str = "RAS"
    crop: str = "foreground"
    intensity: str = "percentile"
    percentiles: tuple[float, float] = (0.5, 99.5)
    foreground_fraction: float = 0.1  # of the 99th percentile: voxels above it are "head"
    interpolation: str = "linear"

    def __post_init__(self):
        """Every value checked with its reason: model files are data from strangers, and a grid of size 0 or a
        spacing of -1 would otherwise fail deep inside the resampler with a message about neither."""
        if isinstance(self.spatial_dims, bool) or self.spatial_dims not in (2, 3):
            raise ValueError(f"spatial_dims must be 2 or 3, got {self.spatial_dims!r}")
        self.spatial_dims = int(self.spatial_dims)
        self.size = tuple(_whole_number("size", s) for s in _sequence("size", self.size))
        self.spacing = tuple(_finite_number("spacing", s) for s in _sequence("spacing", self.spacing))
        self.percentiles = tuple(_finite_number("percentiles", p) for p in _sequence("percentiles", self.percentiles))
        if len(self.size) != self.spatial_dims or len(self.spacing) != self.spatial_dims:
            raise ValueError(f"size {self.size} and spacing {self.spacing} must have {self.spatial_dims} entries")
        if any(s < MIN_GRID_SIDE or s > MAX_GRID_SIDE for s in self.size) or np.prod(self.size, dtype=np.float64) > MAX_GRID_VOXELS:
            raise ValueError(
                f"grid size {self.size} is outside the supported range: each side {MIN_GRID_SIDE}..{MAX_GRID_SIDE} voxels and at "
                f"most {MAX_GRID_VOXELS} voxels in all (larger grids do not fit in memory)"
            )
        if any(s <= 0 for s in self.spacing):
            raise ValueError(f"grid spacing {self.spacing} must be positive (mm per voxel)")
        if self.spatial_dims == 3 and self.orientation not in ORIENTATIONS_3D:
            raise ValueError(f"orientation must be one of {ORIENTATIONS_3D}, got {self.orientation!r}")
        if self.crop not in CROPS:
            raise ValueError(f"crop must be 'foreground' or 'image', got {self.crop!r}")
        if self.intensity not in INTENSITIES:
            raise ValueError(f"intensity must be 'percentile', 'minmax' or 'none', got {self.intensity!r}")
        if len(self.percentiles) != 2 or not 0 <= self.percentiles[0] < self.percentiles[1] <= 100:
            raise ValueError(f"percentiles must be two numbers with 0 <= low < high <= 100, got {self.percentiles}")
        self.foreground_fraction = _finite_number("foreground_fraction", self.foreground_fraction)
        if not 0 <= self.foreground_fraction < 1:
            raise ValueError(f"foreground_fraction must lie in [0, 1) (of the 99th percentile), got {self.foreground_fraction}")
        if self.interpolation not in tuple(INTERPOLATIONS):
            raise ValueError(f"interpolation must be one of {', '.join(INTERPOLATIONS)}, got {self.interpolation!r}")

    def to_dict(self) -> dict:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}

    @classmethod
    def from_dict(cls, data: dict) -> "PreprocessingConfig":
        known = set(cls.__dataclass_fields__)
        unknown = set(data) - known
        if unknown:
            raise ValueError(f"unknown preprocessing keys {sorted(unknown)}: the model file is from a newer version")
        return cls(**data)


#: how the model grid is placed, and how intensities are mapped to [-1, 1] (see PreprocessingConfig)
CROPS = ("foreground", "image")
INTENSITIES = ("percentile", "minmax", "none")


@dataclass
class PreprocessState:
    """What :func:`preprocess` did to one image, so that :func:`to_input_grid` can undo it."""

    origin: tuple[float, ...]
    spacing: tuple[float, ...]
    direction: tuple[float, ...]
    size: tuple[int, ...]
    intensity_low: float
    intensity_high: float
    extra: dict = field(default_factory=dict)

    @property
    def intensity_scale(self) -> float:
        """Input intensity units per model unit (model range [-1, 1] spans high - low)."""
        return (self.intensity_high - self.intensity_low) / 2.0

    def model_grid(self) -> sitk.Image:
        grid = sitk.Image([int(s) for s in self.size], sitk.sitkFloat32)
        grid.SetOrigin(self.origin)
        grid.SetSpacing(self.spacing)
        grid.SetDirection(self.direction)
        return grid

    def to_dict(self) -> dict:
        return asdict(self)


def _grid_direction(config: PreprocessingConfig) -> tuple[float, ...]:
    if config.spatial_dims == 2:
        return (1.0, 0.0, 0.0, 1.0)
    return tuple(sitk.DICOMOrientImageFilter.GetDirectionCosinesFromOrientation(config.orientation))


def head_mask(array: np.ndarray, fraction: float = 0.1) -> np.ndarray:
    """Voxels above `fraction` of the 99th percentile: the head of an MRI whose background is dark. The one
    definition of "head" used by cropping, intensity scaling, the inference mask and the evaluation."""
    return array > fraction * float(np.percentile(array, 99))


def head_mask_on_grid(image: np.ndarray, config: PreprocessingConfig) -> np.ndarray | None:
    """:func:`head_mask` of a preprocessed image (model grid, background mapped to -1); None for
    ``crop="image"`` models (synthetic or pre-cropped images have no background to leave out)."""
    if config.crop != "foreground":
        return None
    image = np.asarray(image, np.float32)
    return head_mask(image - image.min(), config.foreground_fraction)


def _foreground_centre(image: sitk.Image, head: np.ndarray) -> np.ndarray:
    """Physical centre of the bounding box of the head (`head`: :func:`head_mask` of the image)."""
    if not head.any():
        return _image_centre(image)
    # Bounding box from the per-axis projections (as np.argwhere's min/max, without listing every voxel).
    lo, hi = [], []
    for axis in range(head.ndim):
        present = np.flatnonzero(head.any(axis=tuple(a for a in range(head.ndim) if a != axis)))
        lo.append(present[0])
        hi.append(present[-1])
    lo, hi = np.asarray(lo[::-1], float), np.asarray(hi[::-1], float)  # to ITK order
    centre_index = (lo + hi) / 2.0
    return np.asarray(image.TransformContinuousIndexToPhysicalPoint([float(c) for c in centre_index]))


def _image_centre(image: sitk.Image) -> np.ndarray:
    centre_index = [(s - 1) / 2.0 for s in image.GetSize()]
    return np.asarray(image.TransformContinuousIndexToPhysicalPoint(centre_index))


def intensity_range(array: np.ndarray, config: PreprocessingConfig, head: np.ndarray | None = None) -> tuple[float, float]:
    """(low, high) input intensities mapped to -1 and 1; `head`: :func:`head_mask` of `array` when already known."""
    if config.intensity == "none":
        return -1.0, 1.0
    if config.intensity == "minmax":
        low, high = float(array.min()), float(array.max())
    else:
        values = array
        if config.crop == "foreground":
            fg = head_mask(array, config.foreground_fraction) if head is None else head
            if fg.sum() > 10:
                values = array[fg]
        low, high = (float(v) for v in np.percentile(values, config.percentiles))
        # Foreground percentiles leave the background below `low`: widen to the true minimum so that
        # background maps to -1, as it does for the generator's training images.
        low = min(low, float(array.min()))
    if high <= low:
        raise InputError(
            "The input's intensity range is empty after robust scaling (almost every voxel has the same value). "
            "Check that the right volume was selected."
        )
    return low, high


def model_grid_for(image: sitk.Image, config: PreprocessingConfig, head: np.ndarray | None = None) -> tuple[tuple, tuple, tuple, tuple]:
    """(origin, spacing, direction, size) of the model grid placed over `image` (`head`: its
    :func:`head_mask` when already known)."""
    direction = _grid_direction(config)
    if config.crop == "foreground":
        if head is None:
            head = head_mask(sitk.GetArrayViewFromImage(image), config.foreground_fraction)
        centre = _foreground_centre(image, head)
    else:
        centre = _image_centre(image)
    d = np.asarray(direction).reshape(config.spatial_dims, config.spatial_dims)
    half_extent = np.asarray([(s - 1) / 2.0 * sp for s, sp in zip(config.size, config.spacing)])
    origin = centre - d @ half_extent
    return tuple(float(o) for o in origin), config.spacing, direction, config.size


def preprocess(image: sitk.Image, config: PreprocessingConfig, name: str = "input") -> tuple[np.ndarray, PreprocessState]:
    """Validate `image` and bring it onto the model grid; returns (array in numpy order, state)."""
    image = validate_image(image, config.spatial_dims, name=name)
    return preprocess_validated(image, config, input_head_mask(sitk.GetArrayViewFromImage(image), config))


def input_head_mask(array: np.ndarray, config: PreprocessingConfig) -> np.ndarray | None:
    """:func:`head_mask` of an input image for ``crop="foreground"`` models (None otherwise): computed once
    per input and shared by the grid placement, the intensity mapping and the output mask's region."""
    return head_mask(array, config.foreground_fraction) if config.crop == "foreground" else None


def preprocess_validated(image: sitk.Image, config: PreprocessingConfig, head: np.ndarray | None) -> tuple[np.ndarray, PreprocessState]:
    """:func:`preprocess` for an image :func:`validate_image` has already returned, with its
    :func:`input_head_mask`."""
    low, high = intensity_range(sitk.GetArrayViewFromImage(image), config, head)
    origin, spacing, direction, size = model_grid_for(image, config, head)
    state = PreprocessState(origin, spacing, direction, size, low, high)
    resampled = resample_to_grid(image, state.model_grid(), kind="intensity", default=low, interpolation=config.interpolation)
    array = sitk.GetArrayFromImage(resampled)
    if config.intensity != "none":
        array = np.clip((array - low) / (high - low) * 2.0 - 1.0, -1.0, 1.0)
    return array.astype(np.float32), state


def preprocess_companion(image: sitk.Image, state: PreprocessState, kind: str) -> np.ndarray:
    """Bring a mask (kind "label") or a ground-truth difference map (kind "difference", expressed in the
    image's intensity units) onto the grid of an already preprocessed image; differences come out in model units."""
    image = sitk.Cast(image, sitk.sitkFloat32) if kind == "difference" else image
    resampled = resample_to_grid(image, state.model_grid(), kind=kind, default=0.0)
    array = sitk.GetArrayFromImage(resampled).astype(np.float32)
    if kind == "difference":
        array = array / state.intensity_scale
    return array


def resample_to_grid(image: sitk.Image, grid: sitk.Image, kind: str, default: float = 0.0, interpolation: str = "linear") -> sitk.Image:
    interp = sitk.sitkNearestNeighbor if kind == "label" else INTERPOLATIONS[interpolation]
    out_type = image.GetPixelID() if kind == "label" else sitk.sitkFloat32
    return sitk.Resample(image, grid, sitk.Transform(), interp, float(default), out_type)


def to_input_grid(array: np.ndarray, state: PreprocessState, reference: sitk.Image, kind: str) -> sitk.Image:
    """Resample a model-grid array onto `reference`'s grid.

    kind "difference": a signed map in model units, returned in input intensity units, zero outside the model grid.
    kind "intensity": a model-grid image (e.g. a counterfactual), inverse intensity mapping applied.
    kind "probability"/"label": values kept as they are (linear / nearest interpolation), zero outside.
    """
    if reference.GetDimension() != array.ndim:
        raise ValueError(f"array has {array.ndim} dims, reference image {reference.GetDimension()}")
    model_image = sitk.GetImageFromArray(np.ascontiguousarray(array, dtype=np.float32))
    model_image.SetOrigin(state.origin)
    model_image.SetSpacing(state.spacing)
    model_image.SetDirection(state.direction)
    if kind == "intensity":
        model_image = (model_image + 1.0) * state.intensity_scale + state.intensity_low
        default = state.intensity_low
    else:
        default = 0.0
    grid_kind = "label" if kind == "label" else "intensity"
    out = resample_to_grid(model_image, reference, kind=grid_kind, default=default)
    if kind == "difference":
        out = out * state.intensity_scale
    if kind == "label":
        out = sitk.Cast(out, sitk.sitkUInt8)
    out.CopyInformation(reference)
    return out
