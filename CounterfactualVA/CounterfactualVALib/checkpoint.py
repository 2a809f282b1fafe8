"""The model file: safetensors weights (no pickle) with JSON metadata in the safetensors header.

Model files are data from strangers. Loading reads and checks the metadata before any tensor is touched,
refuses pickled PyTorch files outright, and verifies a SHA-256 of the weights so that a corrupted or
edited file is reported instead of silently producing wrong maps.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from . import __version__
from .atomic import atomic_path
from .imageio import InputError

FORMAT_NAME = "counterfactualva-model"
FORMAT_VERSION = 1
METADATA_KEY = "counterfactualva"
REQUIRED_KEYS = ("format", "format_version", "method", "method_config", "preprocessing", "classes", "normal_class", "networks")


class ModelFileError(InputError):
    """A model file that cannot be used: the message says why and what to do."""


@dataclass
class ModelMetadata:
    method: str
    method_config: dict
    preprocessing: dict
    classes: list = field(default_factory=lambda: ["normal", "abnormal"])
    normal_class: int = 0
    networks: list = field(default_factory=list)
    outputs: list = field(default_factory=list)
    training: dict = field(default_factory=dict)
    evaluation: dict = field(default_factory=dict)
    #: the method's declarations (lists of OptionSpec.to_dict()), filled in by save_model: what `attribute`
    #: accepts and the training configuration keys, readable without torch or the method's code
    attribute_options: list | None = None
    config_schema: list | None = None
    package_version: str = __version__
    format: str = FORMAT_NAME
    format_version: int = FORMAT_VERSION
    weights_sha256: str = ""

    def to_dict(self) -> dict:
        return dict(self.__dict__)

    @classmethod
    def from_dict(cls, data: dict) -> "ModelMetadata":
        known = {k: v for k, v in data.items() if k in cls.__dataclass_fields__}
        return cls(**known)

    @property
    def spatial_dims(self) -> int:
        return int(self.preprocessing["spatial_dims"])


def weights_digest(tensors: dict) -> str:
    digest = hashlib.sha256()
    for name in sorted(tensors):
        array = tensors[name].detach().cpu().contiguous().numpy()
        digest.update(name.encode())
        digest.update(str(array.dtype).encode())
        digest.update(np.asarray(array.shape, dtype=np.int64).tobytes())
        digest.update(array.tobytes())
    return digest.hexdigest()


def save_model(path: str | os.PathLike, tensors: dict, metadata: ModelMetadata) -> Path:
    """Write the model file atomically (temporary file + rename)."""
    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().cpu().float().contiguous() for k, v in tensors.items()}
    if metadata.attribute_options is None or metadata.config_schema is None:
        from .methods import get_method_class

        cls = get_method_class(metadata.method)
        if metadata.attribute_options is None:
            metadata.attribute_options = [spec.to_dict() for spec in cls.options]
        if metadata.config_schema is None:
            metadata.config_schema = [spec.to_dict() for spec in cls.config_schema]
    metadata.weights_sha256 = weights_digest(tensors)
    header = {METADATA_KEY: json.dumps(metadata.to_dict(), sort_keys=True)}
    with atomic_path(path, suffix=".safetensors") as tmp:
        save_file(tensors, tmp, metadata=header)
    return path


def _check_container(path: Path) -> None:
    with open(path, "rb") as f:
        head = f.read(16)
    if len(head) >= 9 and head[8:9] == b"{" and struct.unpack("<Q", head[:8])[0] <= os.path.getsize(path):
        return  # safetensors: 8-byte header length, then the JSON header (its first byte may be 0x80 too)
    # torch.save: a zip archive, or a bare pickle (PROTO opcode 0x80 followed by the protocol number 2-5)
    if head[:4] == b"PK\x03\x04" or (head[:1] == b"\x80" and head[1:2] in (b"\x02", b"\x03", b"\x04", b"\x05")):
        raise ModelFileError(
            f"{path} is a pickled PyTorch checkpoint (torch.save). Pickle can run arbitrary code, so CounterfactualVA "
            "does not load it. Use a .safetensors model file written by `counterfactualva train` (or ask its author for one)."
        )
    if len(head) < 9:
        raise ModelFileError(f"{path} is too short to be a model file ({len(head)} bytes). It is truncated or not a model file.")
    raise ModelFileError(
        f"{path} is not a safetensors model file (unrecognised header). Pass the .safetensors file written by "
        "`counterfactualva train`."
    )


def read_metadata(path: str | os.PathLike) -> ModelMetadata:
    """Read and check the metadata only; no tensor is read."""
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise ModelFileError(f"Model file not found: {path}. Pass the path of a .safetensors model file.")
    _check_container(path)
    try:
        with safe_open(str(path), framework="pt") as f:
            raw = f.metadata() or {}
    except Exception as exc:  # safetensors raises its own error types for broken headers
        raise ModelFileError(f"{path} has a damaged safetensors header ({exc}). Re-download or re-export the model file.") from None
    if METADATA_KEY not in raw:
        raise ModelFileError(
            f"{path} is a safetensors file but not a CounterfactualVA model (no '{METADATA_KEY}' metadata). "
            "Train one with `counterfactualva train`, which writes the metadata that says how the model must be fed."
        )
    try:
        data = json.loads(raw[METADATA_KEY])
    except json.JSONDecodeError as exc:
        raise ModelFileError(f"{path}: its metadata is not valid JSON ({exc}). The file was edited or damaged.") from None
    missing = [k for k in REQUIRED_KEYS if k not in data]
    if missing:
        raise ModelFileError(f"{path}: metadata lacks {missing}. The file was edited or written by another tool.")
    if data["format"] != FORMAT_NAME:
        raise ModelFileError(f"{path}: metadata format is {data['format']!r}, expected {FORMAT_NAME!r}.")
    if int(data["format_version"]) > FORMAT_VERSION:
        raise ModelFileError(
            f"{path} uses model format version {data['format_version']}, newer than this CounterfactualVA "
            f"({__version__}, format {FORMAT_VERSION}). Update the extension."
        )
    from .methods import available_methods

    if data["method"] not in available_methods():
        raise ModelFileError(
            f"{path} is a model of method {data['method']!r}, which this version does not know "
            f"(known: {', '.join(available_methods())}). Update the extension or pick another model."
        )
    _check_classes_and_grid(path, data)
    return ModelMetadata.from_dict(data)


def _check_classes_and_grid(path: Path, data: dict) -> None:
    """The explanation needs two classes with one named normal, and a 2D/3D grid it can resample onto."""
    classes, normal = data["classes"], data["normal_class"]
    if not isinstance(classes, list) or len(classes) != 2 or len(set(map(str, classes))) != 2:
        raise ModelFileError(
            f"{path}: the model's classes are {classes!r}; CounterfactualVA explains two-class models (normal vs "
            "abnormal). Retrain with a cohort whose labels are 0 (normal) and 1 (abnormal)."
        )
    if not isinstance(normal, int) or not 0 <= normal < 2:
        raise ModelFileError(f"{path}: normal_class {normal!r} does not index the classes {classes}; the metadata was edited or damaged.")
    from .preprocessing import PreprocessingConfig

    try:
        PreprocessingConfig.from_dict(data["preprocessing"])
    except (TypeError, ValueError) as exc:
        raise ModelFileError(
            f"{path}: the model grid is not a valid 2D or 3D grid ({exc}); the metadata was edited, damaged or written by "
            "a newer version. Re-export the model with `counterfactualva train`, or update the extension."
        ) from None


def load_model_file(path: str | os.PathLike, expected_method: str | None = None) -> tuple[ModelMetadata, dict]:
    """(metadata, tensors) after the metadata checks and the weights' checksum."""
    from safetensors.torch import load_file

    metadata = read_metadata(path)
    if expected_method is not None and metadata.method != expected_method:
        raise ModelFileError(
            f"{path} is a {metadata.method} model, but a {expected_method} model was asked for. Pick a {expected_method} model file."
        )
    try:
        tensors = load_file(str(path))
    except Exception as exc:
        raise ModelFileError(f"{path}: the weights cannot be read ({exc}); the file is truncated or damaged.") from None
    if metadata.weights_sha256 and weights_digest(tensors) != metadata.weights_sha256:
        raise ModelFileError(
            f"{path}: the weights do not match the checksum in the metadata: the file was modified or damaged. "
            "Re-download or re-export it."
        )
    return metadata, tensors
