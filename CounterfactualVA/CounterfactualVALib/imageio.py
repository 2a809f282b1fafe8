"""Reading, validating and writing images with their geometry (SimpleITK: LPS physical space).

Every image that enters the pipeline goes through :func:`read_image` + :func:`validate_image`, so the
errors a user sees for bad input are the same from Slicer, the console and the shell.
"""

from __future__ import annotations

import gzip
import os
import struct
import zlib
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from .atomic import atomic_path

SUPPORTED_EXTENSIONS = (".nii.gz", ".nii", ".nrrd", ".nhdr", ".mha", ".mhd")


class InputError(ValueError):
    """Bad user input: the message names the problem and what to do about it.

    ``InputError(what, fix)`` gives the message ``"<what> — <fix>"``, the form the command line's last
    line takes (``ERROR: <what> — <fix>``); a single argument is a message that already says both.
    """

    def __init__(self, what: str, fix: str | None = None):
        super().__init__(f"{what} — {fix}" if fix else what)


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
    check_file_integrity(path)
    try:
        return sitk.ReadImage(str(path))
    except RuntimeError as exc:
        text = str(exc)
        if "not read completely" in text or "fread got only" in text or "expected" in text and "bytes but received" in text:
            raise InputError(
                f"{path} is truncated: it holds fewer voxel bytes than its header describes",
                "copy or download the file again (the reader would otherwise fill the missing part with zeros).",
            ) from None
        first = text.strip().splitlines()[-1] if text.strip() else "unknown reader error"
        raise InputError(
            f"Cannot read {path} as an image ({first}). Pass a NIfTI (.nii/.nii.gz) or NRRD (.nrrd) file; "
            "DICOM series must be converted first (e.g. load in Slicer and save as NRRD)."
        ) from None


# --- file integrity ------------------------------------------------------------------------------------
# ITK's NIfTI reader fills a truncated file's missing voxels with zeros and turns NaN/Inf voxels into 0
# without a word, so a damaged or unregistered scan would be explained as if it were fine. These checks read
# the file's own bytes before ITK does: every compressed stream to its end (its CRC/length checks then run),
# the NIfTI voxel byte count against the header, and NIfTI float voxels for NaN/Inf. Other formats keep
# NaN/Inf, which validate_image finds.

_CHUNK = 1 << 22
# NIfTI datatype code -> numpy float dtype whose values can be NaN/Inf (complex: both parts are checked)
_NIFTI_FLOAT_TYPES = {16: "f4", 64: "f8", 32: "f4", 1792: "f8", 1536: None}


def check_file_integrity(path: str | os.PathLike) -> None:
    """Refuse a truncated or corrupt compressed stream, a truncated NIfTI file and NaN/Inf NIfTI voxels."""
    path = Path(path)
    ext = image_extension(path)
    if ext in (".nii", ".nii.gz"):
        _check_nifti(path, compressed=ext == ".nii.gz")
    elif str(path).lower().endswith(".gz"):
        with _opened_stream(path, compressed=True) as stream:
            while stream.read(_CHUNK):
                pass
    elif ext == ".nrrd":
        _check_nrrd_gzip(path)
    elif ext == ".mha":
        _check_metaimage(path)


class _opened_stream:
    """The file's bytes (decompressed for gzip), with damage in the compressed stream raised as InputError."""

    def __init__(self, path: Path, compressed: bool):
        self.path, self.compressed = path, compressed

    def __enter__(self):
        self.file = gzip.open(self.path, "rb") if self.compressed else open(self.path, "rb")
        return self

    def read(self, n: int) -> bytes:
        try:
            return self.file.read(n)
        except EOFError:
            raise InputError(
                f"{self.path} is truncated: its compressed data ends before the end-of-stream marker",
                "copy or download the file again (a partial copy would be read with zeros in place of the missing part).",
            ) from None
        except (gzip.BadGzipFile, zlib.error, OSError) as exc:
            raise InputError(
                f"{self.path} is damaged: its compressed data fails the gzip check ({exc})",
                "copy or download the file again, or re-export it from the program that wrote it.",
            ) from None

    def __exit__(self, *exc_info):
        self.file.close()
        return False


def _nifti_header(head: bytes):
    """(dims, datatype, bitpix, vox_offset) from a NIfTI-1/2 header, or None when it is not one."""
    for endian in "<>":
        if len(head) >= 348 and struct.unpack(endian + "i", head[:4])[0] == 348:
            dims = struct.unpack(endian + "8h", head[40:56])
            datatype, bitpix = struct.unpack(endian + "2h", head[70:74])
            vox_offset = struct.unpack(endian + "f", head[108:112])[0]
            return dims, datatype, bitpix, int(vox_offset), endian
        if len(head) >= 540 and struct.unpack(endian + "i", head[:4])[0] == 540:
            datatype, bitpix = struct.unpack(endian + "2h", head[12:16])
            dims = struct.unpack(endian + "8q", head[16:80])
            vox_offset = struct.unpack(endian + "q", head[168:176])[0]
            return dims, datatype, bitpix, int(vox_offset), endian
    return None


def _check_nifti(path: Path, compressed: bool) -> None:
    with _opened_stream(path, compressed) as stream:
        head = stream.read(540)
        header = _nifti_header(head)
        if header is None:
            while stream.read(_CHUNK):  # not a NIfTI header: ITK's reader reports that; still check the stream
                pass
            return
        dims, datatype, bitpix, vox_offset, endian = header
        if not 1 <= dims[0] <= 7 or any(d < 1 for d in dims[1 : dims[0] + 1]) or bitpix <= 0 or bitpix % 8:
            return  # an inconsistent header: ITK's reader refuses it with its own message
        expected = int(np.prod([int(d) for d in dims[1 : dims[0] + 1]], dtype=np.float64)) * (bitpix // 8)
        kind = _NIFTI_FLOAT_TYPES.get(datatype)
        dtype = np.dtype(endian + kind) if kind else None
        pending = head[vox_offset:] if vox_offset < len(head) else b""
        skip = max(0, vox_offset - len(head))
        while skip:
            skipped = len(stream.read(min(skip, _CHUNK)))
            if not skipped:
                break
            skip -= skipped
        seen, bad, carry = 0, 0, b""
        while True:
            block = pending or stream.read(_CHUNK)
            pending = b""
            if not block:
                break
            if seen < expected:
                data = block[: expected - seen]
                seen += len(data)
                if dtype is not None:
                    data = carry + data
                    usable = len(data) - len(data) % dtype.itemsize
                    bad += int((~np.isfinite(np.frombuffer(data[:usable], dtype))).sum())
                    carry = data[usable:]
    if seen < expected:
        raise InputError(
            f"{path} is truncated: its header describes {expected} voxel bytes but the file holds {seen}",
            "copy or download the file again (a partial copy would be read with zeros in place of the missing part).",
        )
    if bad:
        raise InputError(
            f"{path} has {bad} NaN/Inf voxels (the NIfTI reader would silently turn them into 0)",
            "replace them before running (e.g. with 0 or the background value); they usually come from a failed "
            "registration or a division by zero.",
        )


def _check_nrrd_gzip(path: Path) -> None:
    """An attached NRRD gzip stream, read to its end (ITK checks the byte count, not the stream's CRC)."""
    with open(path, "rb") as f:
        head = f.read(1 << 16)
    end = head.find(b"\n\n")
    if not head.startswith(b"NRRD") or end < 0:
        return
    fields = head[:end].decode("latin-1").lower()
    if not any(line.replace(" ", "").startswith(("encoding:gzip", "encoding:gz")) for line in fields.splitlines()):
        return
    if any(line.replace(" ", "").startswith("datafile:") for line in fields.splitlines()):
        return
    with open(path, "rb") as f:
        f.seek(end + 2)
        inflater = zlib.decompressobj(16 + zlib.MAX_WBITS)
        try:
            while block := f.read(_CHUNK):
                inflater.decompress(block)
            complete = inflater.eof
        except zlib.error as exc:
            raise InputError(
                f"{path} is damaged: its gzip-compressed voxel data fails the check ({exc})",
                "copy or download the file again, or re-export it from the program that wrote it.",
            ) from None
    if not complete:
        raise InputError(
            f"{path} is truncated: its compressed voxel data ends before the end-of-stream marker",
            "copy or download the file again.",
        )


_MET_SIZES = {"MET_CHAR": 1, "MET_UCHAR": 1, "MET_SHORT": 2, "MET_USHORT": 2, "MET_INT": 4, "MET_UINT": 4,
              "MET_LONG_LONG": 8, "MET_ULONG_LONG": 8, "MET_FLOAT": 4, "MET_DOUBLE": 8}


def _check_metaimage(path: Path) -> None:
    """A MetaImage with attached data: the voxel bytes (zlib stream read to its end when compressed) against
    DimSize x channels x element size (ITK's own message for a short file says "No such file or directory")."""
    fields, data_start = {}, None
    with open(path, "rb") as f:
        head = f.read(1 << 16)
    position = 0
    for raw_line in head.split(b"\n"):
        position += len(raw_line) + 1
        key, _, value = raw_line.decode("latin-1").partition("=")
        fields[key.strip()] = value.strip()
        if key.strip() == "ElementDataFile":
            data_start = position
            break
    if data_start is None or fields.get("ElementDataFile") != "LOCAL" or fields.get("ElementType") not in _MET_SIZES:
        return
    try:
        voxels = int(np.prod([int(v) for v in fields.get("DimSize", "").split()], dtype=np.float64))
        channels = int(fields.get("ElementNumberOfChannels", "1"))
    except ValueError:
        return
    expected = voxels * channels * _MET_SIZES[fields["ElementType"]]
    truncated = InputError(
        f"{path} is truncated: its header describes {expected} voxel bytes and the file holds fewer",
        "copy or download the file again.",
    )
    with open(path, "rb") as f:
        f.seek(data_start)
        if fields.get("CompressedData", "False").lower() != "true":
            if os.path.getsize(path) - data_start < expected:
                raise truncated
            return
        inflater, produced = zlib.decompressobj(), 0
        try:
            while block := f.read(_CHUNK):
                produced += len(inflater.decompress(block))
        except zlib.error as exc:
            raise InputError(
                f"{path} is damaged: its zlib-compressed voxel data fails the check ({exc})",
                "copy or download the file again, or re-export it from the program that wrote it.",
            ) from None
    if not inflater.eof or produced < expected:
        raise truncated


def validate_image(image: sitk.Image, spatial_dims: int, name: str = "input") -> sitk.Image:
    """Check that `image` is a finite, non-constant scalar image with `spatial_dims` dimensions.

    A 3D file with a single slice is accepted by a 2D model (the slice is extracted), since many tools write
    2D images as one-slice volumes. Returns the (possibly squeezed) image as float32.
    """
    if image.GetNumberOfComponentsPerPixel() != 1:
        raise InputError(
            f"The {name} has {image.GetNumberOfComponentsPerPixel()} components per voxel (a vector/RGB image)",
            "models take one scalar MRI channel: convert it to a scalar volume first (e.g. Slicer's "
            "'Vector to Scalar Volume' module, or pick one channel).",
        )
    dim = image.GetDimension()
    if dim == 4:
        raise InputError(
            f"The {name} is 4D (size {image.GetSize()})", "models take one 3D volume: extract a single time point/volume first."
        )
    if dim == 3 and spatial_dims == 2:
        if 1 in image.GetSize():
            axis = image.GetSize().index(1)
            size = list(image.GetSize())
            size[axis] = 0
            image = sitk.Extract(image, size, [0, 0, 0])
        else:
            raise InputError(
                f"The model is 2D but the {name} is a 3D volume of size {image.GetSize()}",
                "use a 3D model, or pass a single 2D slice.",
            )
    elif dim == 2 and spatial_dims == 3:
        raise InputError(
            f"The model is 3D but the {name} is a 2D image of size {image.GetSize()}", "use a 2D model for 2D images."
        )
    elif dim not in (2, 3):
        raise InputError(f"The {name} has {dim} dimensions", "only 2D and 3D images are supported: pass a 2D image or a 3D volume.")
    if min(image.GetSize()) < 2:
        what = "a single slice" if spatial_dims == 3 else "a single row or column"
        raise InputError(
            f"The {name} is {what} (size {image.GetSize()}) but the model is {spatial_dims}D",
            f"pass the whole {spatial_dims}D {'volume (for DICOM: the whole series, not one file)' if spatial_dims == 3 else 'image'}.",
        )
    _check_geometry(image, name)
    image = sitk.Cast(image, sitk.sitkFloat32)
    array = sitk.GetArrayViewFromImage(image)
    finite = np.isfinite(array)
    if not finite.all():
        bad = int((~finite).sum())
        raise InputError(
            f"The {name} has {bad} NaN/Inf voxels of {array.size}",
            "replace them (e.g. with 0) before running; they usually come from a failed registration or division.",
        )
    if float(array.max()) == float(array.min()):
        raise InputError(
            f"The {name} is constant (every voxel is {float(array.min())}): there is no image to explain",
            "check that the right volume was selected and that it loaded correctly.",
        )
    return image


def _check_geometry(image: sitk.Image, name: str) -> None:
    """Spacing, origin and direction that a resampler can map to physical space and back."""
    spacing, origin = np.array(image.GetSpacing()), np.array(image.GetOrigin())
    direction = np.array(image.GetDirection()).reshape(image.GetDimension(), image.GetDimension())
    if not np.all(np.isfinite(spacing)) or np.any(spacing <= 0):
        raise InputError(
            f"The {name} has voxel spacing {tuple(spacing.tolist())}; every spacing must be a positive number of mm",
            "fix the file's header (e.g. in Slicer: Volumes module > Volume Information > Image Spacing) and save it again.",
        )
    if not np.all(np.isfinite(origin)) or not np.all(np.isfinite(direction)):
        raise InputError(
            f"The {name} has a non-finite origin or direction in its header",
            "fix the file's header (or reset its orientation in the program that wrote it) and save it again.",
        )
    if abs(np.linalg.det(direction)) < 1e-6:
        raise InputError(
            f"The {name}'s direction matrix {tuple(np.round(direction, 4).ravel().tolist())} is singular: its axes do not span space",
            "fix the file's orientation header (e.g. re-export it from the scanner software or Slicer).",
        )


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
