"""Reading, validating and writing images with their geometry (SimpleITK: LPS physical space).

Every image that enters the pipeline goes through :func:`read_image` + :func:`validate_image`, so the
errors a user sees for bad input are the same from Slicer, the console and the shell.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from .atomic import atomic_path

SUPPORTED_EXTENSIONS = (".nii.gz", ".nii", ".nrrd", ".nhdr", ".mha", ".mhd")


class InputError(ValueError):
    """Bad user input: the message names the problem and what to do about it."""


def image_extension(path: str | os.PathLike) -> str:
    name = str(path).lower()
    for ext in SUPPORTED_EXTENSIONS:
        if name.endswith(ext):
            return ext
    return Path(name).suffix


def read_image(path: str | os.PathLike) -> sitk.Image:
    path = Path(path)
    if not path.exists():
        raise InputError(f"Input file not found: {path}. Check the path (relative paths are taken from the current folder).")
    if path.is_dir():
        raise InputError(f"{path} is a folder, not an image file. Pass a NIfTI (.nii/.nii.gz) or NRRD (.nrrd) file.")
    try:
        return sitk.ReadImage(str(path))
    except RuntimeError as exc:
        first = str(exc).strip().splitlines()[-1] if str(exc).strip() else "unknown reader error"
        raise InputError(
            f"Cannot read {path} as an image ({first}). Pass a NIfTI (.nii/.nii.gz) or NRRD (.nrrd) file; "
            "DICOM series must be converted first (e.g. load in Slicer and save as NRRD)."
        ) from None


def validate_image(image: sitk.Image, spatial_dims: int, name: str = "input") -> sitk.Image:
    """Check that `image` is a finite, non-constant scalar image with `spatial_dims` dimensions.

    A 3D file with a single slice is accepted by a 2D model (the slice is extracted), since many tools write
    2D images as one-slice volumes. Returns the (possibly squeezed) image as float32.
    """
    if image.GetNumberOfComponentsPerPixel() != 1:
        raise InputError(
            f"The {name} has {image.GetNumberOfComponentsPerPixel()} components per voxel (a vector/RGB image). "
            "Models take one scalar MRI channel: convert it to a scalar volume first (e.g. Slicer's "
            "'Vector to Scalar Volume' module, or pick one channel)."
        )
    dim = image.GetDimension()
    if dim == 4:
        raise InputError(
            f"The {name} is 4D (size {image.GetSize()}). Models take one 3D volume: extract a single time point/volume first."
        )
    if dim == 3 and spatial_dims == 2:
        if 1 in image.GetSize():
            axis = image.GetSize().index(1)
            size = list(image.GetSize())
            size[axis] = 0
            image = sitk.Extract(image, size, [0, 0, 0])
        else:
            raise InputError(
                f"The model is 2D but the {name} is a 3D volume of size {image.GetSize()}. "
                "Use a 3D model, or pass a single 2D slice."
            )
    elif dim == 2 and spatial_dims == 3:
        raise InputError(
            f"The model is 3D but the {name} is a 2D image of size {image.GetSize()}. Use a 2D model for 2D images."
        )
    elif dim not in (2, 3):
        raise InputError(f"The {name} has {dim} dimensions; only 2D and 3D images are supported.")
    image = sitk.Cast(image, sitk.sitkFloat32)
    array = sitk.GetArrayViewFromImage(image)
    finite = np.isfinite(array)
    if not finite.all():
        bad = int((~finite).sum())
        raise InputError(
            f"The {name} has {bad} NaN/Inf voxels of {array.size}. Replace them (e.g. with 0) before running; "
            "they usually come from a failed registration or division."
        )
    if array.size == 0:
        raise InputError(f"The {name} is empty (size {image.GetSize()}).")
    if float(array.max()) == float(array.min()):
        raise InputError(
            f"The {name} is constant (every voxel is {float(array.min())}): there is no image to explain. "
            "Check that the right volume was selected and that it loaded correctly."
        )
    return image


def write_image(image: sitk.Image, path: str | os.PathLike, compress: bool = True) -> Path:
    """Write atomically: a reader never sees a half-written file under the final name."""
    path = Path(path)
    with atomic_path(path, suffix=image_extension(path)) as tmp:
        sitk.WriteImage(image, tmp, compress)
    return path


def image_from_array(array: np.ndarray, reference: sitk.Image) -> sitk.Image:
    """A new image with `reference`'s geometry; `array` is in numpy order (z, y, x)."""
    out = sitk.GetImageFromArray(np.ascontiguousarray(array))
    out.CopyInformation(reference)
    return out
