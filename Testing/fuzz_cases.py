"""The property-based fuzz cases, shared by Testing/test_fuzz.py (about 500 cases per CI run) and
benchmarks/fuzz_long.py (>= 5,000 cases): hypothesis strategies for random volumes, image headers and model
files, and the one check every case must pass.

The check runs `counterfactualva attribute` in-process through `CounterfactualVACLI.cli.main`, the same entry
point and error boundary as the installed command, and accepts exactly two outcomes:
- exit 0 with counterfactual, attribution and mask in the input file's own geometry (size, spacing, origin,
  direction), or
- exit 2 with a last stderr line `ERROR: <what> — <fix>`;
and in both: no traceback on the terminal, the input folder byte for byte unchanged, no temporary file left.
"""

from __future__ import annotations

import json
import random
import re
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import SimpleITK as sitk
from hypothesis import strategies as st
from reliability_support import folder_digest, last_line, leftover_temporaries, run_cli_in_process

FORMATS = (".nii.gz", ".nii", ".nrrd", ".mha")
DTYPES = ("uint8", "int16", "float32", "float64")


@dataclass
class VolumeCase:
    """One input file to write: array in numpy order, geometry in ITK order."""

    shape: tuple  # numpy order (z, y, x) or (y, x); a trailing axis for vector components
    dtype: str
    spacing: tuple
    origin: tuple
    direction: tuple  # row-major, dim x dim
    content: str  # "random" | "constant" | "nan" | "inf" | "blob"
    components: int
    extension: str
    truncate: float | None  # keep this fraction of the file's bytes
    header_edits: list = field(default_factory=list)  # (offset, byte) pairs applied to the file's first bytes
    seed: int = 0
    figure: bool = False

    @property
    def dimension(self) -> int:
        return len(self.shape) - (1 if self.components > 1 else 0)


def _rotation(dim: int, rng: random.Random) -> tuple:
    if dim == 2:
        angle = rng.uniform(-np.pi, np.pi)
        return (np.cos(angle), -np.sin(angle), np.sin(angle), np.cos(angle))
    transform = sitk.Euler3DTransform()
    transform.SetRotation(rng.uniform(-np.pi, np.pi), rng.uniform(-1.5, 1.5), rng.uniform(-np.pi, np.pi))
    return tuple(transform.GetMatrix())


@st.composite
def volume_cases(draw, max_side: int = 10) -> VolumeCase:
    dim = draw(st.sampled_from([2, 3, 3, 3, 4]))
    sides = tuple(draw(st.lists(st.integers(1, max_side), min_size=dim, max_size=dim)))
    if dim == 3 and draw(st.booleans()):
        sides = (1,) + sides[1:]  # one-slice volumes: a single DICOM file, a 2D slice saved as 3D
    components = draw(st.sampled_from([1, 1, 1, 1, 3]))
    seed = draw(st.integers(0, 2**31 - 1))
    rng = random.Random(seed)
    spacing_choice = draw(st.sampled_from(["usual", "usual", "anisotropic", "tiny", "zero", "negative"]))
    spacing = {
        "usual": tuple(1.0 for _ in range(dim)),
        "anisotropic": tuple(rng.choice([0.5, 0.9, 1.2, 3.0, 5.5]) for _ in range(dim)),
        "tiny": tuple(1e-4 for _ in range(dim)),
        "zero": (0.0,) + tuple(1.0 for _ in range(dim - 1)),
        "negative": (-2.0,) + tuple(1.0 for _ in range(dim - 1)),
    }[spacing_choice]
    direction_choice = draw(st.sampled_from(["identity", "identity", "oblique", "flipped", "singular"]))
    if dim == 4:
        direction = tuple(np.eye(4).ravel())
    elif direction_choice == "identity":
        direction = tuple(np.eye(dim).ravel())
    elif direction_choice == "oblique":
        direction = _rotation(dim, rng)
    elif direction_choice == "flipped":
        direction = tuple(np.diag([-1.0] + [1.0] * (dim - 1)).ravel())
    else:
        matrix = np.eye(dim)
        matrix[1] = matrix[0]
        direction = tuple(matrix.ravel())
    origin = tuple(rng.uniform(-200, 200) for _ in range(dim))
    content = draw(st.sampled_from(["random", "random", "blob", "blob", "constant", "nan", "inf"]))
    dtype = draw(st.sampled_from(DTYPES))
    if content in ("nan", "inf"):
        dtype = draw(st.sampled_from(["float32", "float64"]))
    extension = draw(st.sampled_from(FORMATS))
    truncate = draw(st.sampled_from([None] * 6 + [0.02, 0.5, 0.97]))
    header_edits = []
    if draw(st.integers(0, 9)) == 0:
        header_edits = draw(st.lists(st.tuples(st.integers(0, 347), st.integers(0, 255)), min_size=1, max_size=4))
    shape = tuple(reversed(sides)) + ((components,) if components > 1 else ())
    return VolumeCase(shape, dtype, spacing, origin, direction, content, components, extension, truncate, header_edits, seed, draw(st.integers(0, 7)) == 0)


def _array(case: VolumeCase) -> np.ndarray:
    rng = np.random.default_rng(case.seed)
    if case.content == "constant":
        array = np.full(case.shape, 7.0)
    elif case.content == "blob":
        grids = np.meshgrid(*[np.linspace(-1, 1, n) for n in case.shape], indexing="ij")
        array = 100.0 * (sum(g**2 for g in grids) < 0.6) + rng.normal(0, 2, case.shape)
    else:
        array = rng.normal(50, 20, case.shape)
    if case.dtype in ("uint8", "int16"):
        array = np.clip(np.round(array), 0, 255)
    array = array.astype(case.dtype)
    if case.content in ("nan", "inf") and array.size:
        array.reshape(-1)[rng.integers(0, array.size)] = np.nan if case.content == "nan" else -np.inf
    return array


def write_volume_case(case: VolumeCase, folder: Path) -> Path:
    """Write the case's file into `folder` (by hand as NRRD when ITK will not write such a header)."""
    path = folder / f"scan{case.extension}"
    array = _array(case)
    try:
        image = sitk.GetImageFromArray(array, isVector=case.components > 1)
        image.SetSpacing(case.spacing)
        image.SetOrigin(case.origin)
        image.SetDirection(case.direction)
        sitk.WriteImage(image, str(path), case.extension in (".nii.gz", ".mha", ".nrrd"))
    except RuntimeError:  # ITK refuses zero/negative spacing and singular directions: such files exist anyway
        return _write_raw_nrrd(case, array, folder)
    data = bytearray(path.read_bytes())
    for offset, value in case.header_edits:
        if case.extension == ".nii" and offset < len(data):
            data[offset] = value
    if case.truncate is not None:
        data = data[: max(1, int(len(data) * case.truncate))]
    path.write_bytes(bytes(data))
    return path


def _write_raw_nrrd(case: VolumeCase, array: np.ndarray, folder: Path) -> Path:
    """ITK will not make an image with a zero/negative spacing or a singular direction, but files with such
    headers exist: written by hand here as NRRD, whose space directions can say anything."""
    path = folder / "scan.nrrd"
    dim = case.dimension
    types = {"uint8": "uchar", "int16": "short", "float32": "float", "float64": "double"}
    direction = np.array(case.direction).reshape(dim, dim)
    columns = [direction[:, i] * case.spacing[i] for i in range(dim)]
    fmt = lambda v: "(" + ",".join(f"{x:.17g}" for x in v) + ")"  # noqa: E731
    sizes = list(reversed(array.shape[:dim]))
    header = [
        "NRRD0004",
        f"type: {types[case.dtype]}",
        f"dimension: {dim + (1 if case.components > 1 else 0)}",
        f"space dimension: {dim}",
        f"sizes: {' '.join(map(str, ([case.components] if case.components > 1 else []) + sizes))}",
        f"space directions: {'none ' if case.components > 1 else ''}{' '.join(fmt(c) for c in columns)}",
        f"space origin: {fmt(case.origin)}",
        "endian: little",
        "encoding: raw",
    ]
    data = ("\n".join(header) + "\n\n").encode() + np.ascontiguousarray(array).astype(array.dtype.newbyteorder("<")).tobytes()
    if case.truncate is not None:
        data = data[: max(1, int(len(data) * case.truncate))]
    path.write_bytes(data)
    return path


# --- model files --------------------------------------------------------------------------------------------

JSON_VALUES = st.one_of(
    st.none(), st.booleans(), st.integers(-(2**40), 2**40), st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=6), st.lists(st.integers(-3, 5000), max_size=4), st.just({}),
)
METADATA_PATHS = (
    ("preprocessing", "size"), ("preprocessing", "spacing"), ("preprocessing", "spatial_dims"), ("preprocessing", "percentiles"),
    ("preprocessing", "interpolation"), ("preprocessing", "orientation"), ("preprocessing", "crop"), ("preprocessing", "intensity"),
    ("preprocessing", "foreground_fraction"), ("normal_class",), ("classes",), ("format_version",), ("format",), ("method",),
    ("networks",), ("method_config",), ("method_config", "ngf"), ("method_config", "n_blocks"), ("attribute_options",),
    ("preprocessing",), ("outputs",), ("training",),
)


@dataclass
class ModelCase:
    kind: str  # "value" (a metadata value replaced), "bytes" (bytes flipped), "truncate"
    path: tuple = ()
    value: object = None
    restamp: bool = False
    flips: list = field(default_factory=list)
    keep: float = 1.0


@st.composite
def model_cases(draw) -> ModelCase:
    kind = draw(st.sampled_from(["value", "value", "value", "bytes", "truncate"]))
    if kind == "value":
        return ModelCase("value", draw(st.sampled_from(METADATA_PATHS)), draw(JSON_VALUES), restamp=draw(st.booleans()))
    if kind == "bytes":
        return ModelCase("bytes", flips=draw(st.lists(st.tuples(st.floats(0, 1, exclude_max=True), st.integers(1, 255)), min_size=1, max_size=3)))
    return ModelCase("truncate", keep=draw(st.floats(0, 1, exclude_max=True)))


def write_model_case(case: ModelCase, source: Path, target: Path) -> Path:
    from reliability_support import edit_model_metadata

    if case.kind == "value":
        def edit(metadata):
            node = metadata
            for key in case.path[:-1]:
                if not isinstance(node.get(key), dict):
                    node[key] = {}
                node = node[key]
            node[case.path[-1]] = case.value

        return edit_model_metadata(source, target, edit, restamp=case.restamp)
    data = bytearray(source.read_bytes())
    if case.kind == "bytes":
        for where, xor in case.flips:
            data[int(where * len(data))] ^= xor
    else:
        data = data[: int(case.keep * len(data))]
    target.write_bytes(bytes(data))
    return target


# --- the check ----------------------------------------------------------------------------------------------


def _geometry(image: sitk.Image):
    return image.GetSize(), np.array(image.GetSpacing()), np.array(image.GetOrigin()), np.array(image.GetDirection())


def check_attribution(model: Path, scan: Path, out: Path, extra_args=()) -> str:
    """Run one case and assert the contract; returns the outcome: "ok" or the refusal's first words."""
    inputs_before = folder_digest(scan.parent)
    model_before = model.read_bytes()
    code, _, err = run_cli_in_process("attribute", "--model", model, "--input", scan, "--out", out, *extra_args)
    assert "Traceback (most recent call last)" not in err, err
    assert folder_digest(scan.parent) == inputs_before, "the input folder changed"
    assert model.read_bytes() == model_before, "the model file changed"
    assert not leftover_temporaries(out, scan.parent, model.parent), leftover_temporaries(out, scan.parent, model.parent)
    if code == 0:
        summary = json.loads((out / "summary.json").read_text())
        reference = sitk.ReadImage(str(scan))
        size, spacing, origin, direction = _geometry(reference)
        for key in ("counterfactual", "attribution", "mask"):
            name = summary["outputs"][key]
            if name is None and key == "counterfactual":
                continue
            written = sitk.ReadImage(str(out / name))
            got = _geometry(written)
            assert got[0] == size, (key, got[0], size)
            assert np.allclose(got[1], spacing, rtol=1e-5, atol=1e-6), (key, got[1], spacing)
            assert np.allclose(got[2], origin, rtol=1e-5, atol=1e-4), (key, got[2], origin)
            assert np.allclose(got[3], direction, atol=1e-4), (key, got[3], direction)
            assert np.isfinite(sitk.GetArrayViewFromImage(written)).all(), key
        return "ok"
    line = last_line(err)
    assert code == 2, (code, err)
    assert line.startswith("ERROR: ") and " — " in line, line
    what = line[len("ERROR: "):].split(" — ")[0]
    for path in (str(model), str(scan), str(out)):
        what = what.replace(path, "<file>")
    return "refused: " + re.sub(r"\d+", "#", " ".join(what.split()[:7]))


def run_volume_case(case: VolumeCase, model_3d: Path, model_2d: Path, use_2d: bool) -> str:
    with tempfile.TemporaryDirectory(prefix="cfva-fuzz-") as tmp:
        tmp = Path(tmp)
        (tmp / "in").mkdir()
        scan = write_volume_case(case, tmp / "in")
        extra = [] if case.figure else ["--no-figure"]
        return check_attribution(model_2d if use_2d else model_3d, scan, tmp / "out", extra)


def run_model_case(case: ModelCase, model: Path, scan: Path) -> str:
    with tempfile.TemporaryDirectory(prefix="cfva-fuzz-") as tmp:
        tmp = Path(tmp)
        (tmp / "models").mkdir()
        mutated = write_model_case(case, model, tmp / "models" / "model.safetensors")
        return check_attribution(mutated, scan, tmp / "out", ["--no-figure"])

