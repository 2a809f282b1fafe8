"""The model file: safetensors weights (no pickle) with JSON metadata in the safetensors header.

Model files are data from strangers. Loading reads and checks the metadata before any tensor is touched
(every value with its reason and fix), refuses pickled PyTorch files outright, and verifies one required
SHA-256 over the metadata text and the weights together, so that a corrupted or edited file (weights,
grid, percentiles or classes alike) is reported instead of silently producing wrong maps.

Format 2 (this version) stores the checksum beside the metadata in the header under ``counterfactualva_sha256``.
Format 1 files (an older release: a weights-only checksum that an empty string switched off) are refused
with the upgrade command: ``python -m CounterfactualVALib.checkpoint upgrade FILE`` verifies their weights
checksum and re-stamps the header in place, weights byte for byte unchanged.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from . import __version__
from .atomic import atomic_path
from .imageio import InputError

FORMAT_NAME = "counterfactualva-model"
FORMAT_VERSION = 2
METADATA_KEY = "counterfactualva"
CHECKSUM_KEY = "counterfactualva_sha256"
REQUIRED_KEYS = ("format", "format_version", "method", "method_config", "preprocessing", "classes", "normal_class", "networks")
UPGRADE_COMMAND = "python -m CounterfactualVALib.checkpoint upgrade"
#: preprocessing keys a model file must state: the model grid
GRID_KEYS = ("spatial_dims", "size", "spacing")


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


def model_checksum(metadata_text: str, tensors: dict) -> str:
    """SHA-256 over the metadata exactly as stored (its JSON text) and the weights (:func:`weights_digest`)."""
    digest = hashlib.sha256(b"counterfactualva-model-checksum-v2\n")
    digest.update(metadata_text.encode("utf-8"))
    digest.update(b"\n")
    digest.update(weights_digest(tensors).encode("ascii"))
    return digest.hexdigest()


def save_model(path: str | os.PathLike, tensors: dict, metadata: ModelMetadata) -> Path:
    """Write the model file atomically (temporary file + rename), with the checksum over metadata + weights."""
    path = Path(path)
    tensors = {k: v.detach().cpu().float().contiguous() for k, v in tensors.items()}
    if metadata.attribute_options is None or metadata.config_schema is None:
        from .methods import get_method_class

        cls = get_method_class(metadata.method)
        if metadata.attribute_options is None:
            metadata.attribute_options = [spec.to_dict() for spec in cls.options]
        if metadata.config_schema is None:
            metadata.config_schema = [spec.to_dict() for spec in cls.config_schema]
    metadata.format, metadata.format_version = FORMAT_NAME, FORMAT_VERSION
    return _write_model_file(path, tensors, json.dumps(metadata.to_dict(), sort_keys=True))


def _write_model_file(path: Path, tensors: dict, metadata_text: str) -> Path:
    from safetensors.torch import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    header = {METADATA_KEY: metadata_text, CHECKSUM_KEY: model_checksum(metadata_text, tensors)}
    with atomic_path(path, suffix=".safetensors") as tmp:
        save_file(tensors, tmp, metadata=header)
    return path


def _check_container(path: Path, content: bytes | None = None) -> None:
    if content is None:
        with open(path, "rb") as f:
            head = f.read(16)
        size = os.path.getsize(path)
    else:
        head, size = content[:16], len(content)
    if len(head) >= 9 and head[8:9] == b"{" and struct.unpack("<Q", head[:8])[0] <= size:
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


def _read_header(path: Path, content: bytes | None = None) -> dict:
    """The safetensors header's string metadata, after the container checks: of the file, or of `content`, the
    file's bytes already read (so that header and weights come from one snapshot of the file)."""
    from safetensors import safe_open

    if content is None and not path.is_file():
        raise ModelFileError(f"Model file not found: {path}", "pass the path of a .safetensors model file.")
    _check_container(path, content)
    try:
        if content is not None:
            length = struct.unpack("<Q", content[:8])[0]
            metadata = json.loads(content[8 : 8 + length]).get("__metadata__") or {}
            if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
                raise ValueError("its __metadata__ is not a string map")
            return metadata
        with safe_open(str(path), framework="pt") as f:
            return f.metadata() or {}
    except Exception as exc:  # safetensors raises its own error types for broken headers
        raise ModelFileError(f"{path} has a damaged safetensors header ({exc})", "re-download or re-export the model file.") from None


def _read_whole_file(path: Path) -> bytes:
    """The model file's bytes, read once. The weights are parsed from this copy, not from a memory map of the
    file: a file replaced in place while it is mapped (a newer export copied over it) kills the process with
    SIGBUS, where a copy in memory gives at worst a checksum error naming the file."""
    if not path.is_file():
        raise ModelFileError(f"Model file not found: {path}", "pass the path of a .safetensors model file.")
    return path.read_bytes()


def read_metadata(path: str | os.PathLike) -> ModelMetadata:
    """Read and check the metadata only; no tensor is read (the checksum is verified by :func:`load_model_file`)."""
    path = Path(path)
    return ModelMetadata.from_dict(_checked_metadata(path, _read_header(path)))


def _checked_metadata(path: Path, raw: dict, require_checksum: bool = True) -> dict:
    if METADATA_KEY not in raw:
        raise ModelFileError(
            f"{path} is a safetensors file but not a CounterfactualVA model (no '{METADATA_KEY}' metadata)",
            "train one with `counterfactualva train`, which writes the metadata that says how the model must be fed.",
        )
    try:
        data = json.loads(raw[METADATA_KEY])
    except json.JSONDecodeError as exc:
        raise ModelFileError(f"{path}: its metadata is not valid JSON ({exc})", "the file was edited or damaged: re-download or re-export it.") from None
    if not isinstance(data, dict):
        raise ModelFileError(f"{path}: its metadata is a JSON {type(data).__name__}, not an object", "the file was edited or damaged: re-download or re-export it.")
    missing = [k for k in REQUIRED_KEYS if k not in data]
    if missing:
        raise ModelFileError(f"{path}: metadata lacks {missing}", "the file was edited or written by another tool: re-export it with `counterfactualva train`.")
    if data["format"] != FORMAT_NAME:
        raise ModelFileError(f"{path}: metadata format is {data['format']!r}, expected {FORMAT_NAME!r}", "pass a model file written by `counterfactualva train`.")
    version = data["format_version"]
    if isinstance(version, bool) or not isinstance(version, int):
        raise ModelFileError(
            f"{path}: metadata format_version is {version!r}, not a whole number", "the file was edited or damaged: re-download or re-export it."
        )
    if version > FORMAT_VERSION:
        raise ModelFileError(
            f"{path} uses model format version {version}, newer than this CounterfactualVA ({__version__}, format {FORMAT_VERSION})",
            "update the extension.",
        )
    if require_checksum and (version < FORMAT_VERSION or CHECKSUM_KEY not in raw):
        if version < FORMAT_VERSION:
            raise ModelFileError(
                f"{path} is a format {version} model file (an older CounterfactualVA), without the checksum over metadata and weights that this version requires",
                f"upgrade it once with `{UPGRADE_COMMAND} {path}` (it verifies the old weights checksum first), or re-export it.",
            )
        raise ModelFileError(
            f"{path} has no '{CHECKSUM_KEY}' checksum in its header", "the file was edited or damaged: re-download or re-export it."
        )
    from .methods import available_methods

    if not isinstance(data["method"], str) or data["method"] not in available_methods():
        raise ModelFileError(
            f"{path} is a model of method {data['method']!r}, which this version does not know (known: {', '.join(available_methods())})",
            "update the extension or pick another model.",
        )
    _check_values(path, data)
    return data


def _check_values(path: Path, data: dict) -> None:
    """Every value the pipeline relies on, with its reason: two classes with an integer normal class, the
    containers the code indexes, and a grid it can resample onto (PreprocessingConfig's checks)."""
    damaged = "the metadata was edited or damaged: re-download or re-export the model file."
    classes, normal = data["classes"], data["normal_class"]
    if not isinstance(classes, list) or len(classes) != 2 or len(set(map(str, classes))) != 2:
        raise ModelFileError(
            f"{path}: the model's classes are {classes!r}; CounterfactualVA explains two-class models (normal vs abnormal)",
            "retrain with a cohort whose labels are 0 (normal) and 1 (abnormal).",
        )
    if isinstance(normal, bool) or not isinstance(normal, int) or not 0 <= normal < 2:
        raise ModelFileError(f"{path}: normal_class {normal!r} does not index the classes {classes} (it must be the integer 0 or 1)", damaged)
    for key, kind in (("method_config", dict), ("preprocessing", dict), ("networks", list), ("outputs", list), ("training", dict), ("evaluation", dict)):
        if key in data and not isinstance(data[key], kind):
            raise ModelFileError(f"{path}: metadata '{key}' is a {type(data[key]).__name__}, expected a JSON {'object' if kind is dict else 'list'}", damaged)
    if not all(isinstance(name, str) for name in data["networks"]):
        raise ModelFileError(f"{path}: metadata 'networks' must list network names, got {data['networks']!r}", damaged)
    for key in ("attribute_options", "config_schema"):
        if data.get(key) is not None:
            from .method_options import OptionSpec

            try:
                if not isinstance(data[key], list):
                    raise TypeError("not a list")
                for spec in data[key]:
                    OptionSpec.from_dict(spec)
            except (TypeError, ValueError, AttributeError) as exc:
                raise ModelFileError(f"{path}: metadata '{key}' is not a list of option declarations ({exc})", damaged) from None
    from .preprocessing import PreprocessingConfig

    # the grid the networks were trained on has no default that is right for every model: refused when missing
    # (other preprocessing keys default to what versions before them did)
    absent = [key for key in GRID_KEYS if key not in data["preprocessing"]]
    if absent:
        raise ModelFileError(
            f"{path}: the model's preprocessing lacks {absent}, so the grid the model was trained on is unknown",
            "the metadata was edited or damaged: use the model file exactly as `counterfactualva train` wrote it, or retrain the model.",
        )
    try:
        PreprocessingConfig.from_dict(data["preprocessing"])
    except (TypeError, ValueError) as exc:
        raise ModelFileError(
            f"{path}: the model grid is not a valid 2D or 3D grid ({str(exc).rstrip('.')})",
            "the metadata was edited, damaged or written by a newer version: re-export the model with "
            "`counterfactualva train`, or update the extension.",
        ) from None


def load_model_file(path: str | os.PathLike, expected_method: str | None = None) -> tuple[ModelMetadata, dict]:
    """(metadata, tensors) after the metadata checks and the checksum over metadata + weights."""
    from safetensors.torch import load

    path = Path(path)
    content = _read_whole_file(path)
    raw = _read_header(path, content)
    metadata = ModelMetadata.from_dict(_checked_metadata(path, raw))
    if expected_method is not None and metadata.method != expected_method:
        raise ModelFileError(
            f"{path} is a {metadata.method} model, but a {expected_method} model was asked for", f"pick a {expected_method} model file."
        )
    try:
        tensors = load(content)
    except Exception as exc:
        raise ModelFileError(f"{path}: the weights cannot be read ({exc})", "the file is truncated or damaged: re-download or re-export it.") from None
    if model_checksum(raw[METADATA_KEY], tensors) != raw[CHECKSUM_KEY]:
        raise ModelFileError(
            f"{path}: the metadata or the weights do not match the file's checksum: the file was modified or damaged",
            "re-download or re-export it (editing the metadata by hand is not supported: it says how the model must be fed).",
        )
    return metadata, tensors


def upgrade_model_file(path: str | os.PathLike, out: str | os.PathLike | None = None) -> Path:
    """Re-stamp a format 1 model file as format 2: its old weights checksum is verified first, then the
    metadata (format_version 2, the weights-only checksum dropped) and the new checksum over metadata +
    weights are written; the tensors are written back unchanged, byte for byte."""
    from safetensors.torch import load

    path = Path(path)
    content = _read_whole_file(path)
    raw = _read_header(path, content)
    data = _checked_metadata(path, raw, require_checksum=False)
    if data["format_version"] == FORMAT_VERSION and CHECKSUM_KEY in raw:
        raise ModelFileError(f"{path} is already a format {FORMAT_VERSION} model file", "nothing to upgrade.")
    tensors = load(content)
    expected = data.pop("weights_sha256", "")
    if not expected or weights_digest(tensors) != expected:
        raise ModelFileError(
            f"{path}: its weights do not match its format 1 weights checksum (or it has none), so its integrity cannot be vouched for",
            "re-export it with `counterfactualva train` instead of upgrading.",
        )
    data["format_version"] = FORMAT_VERSION
    return _write_model_file(Path(out) if out else path, tensors, json.dumps(data, sort_keys=True))


if __name__ == "__main__":  # python -m CounterfactualVALib.checkpoint upgrade FILE [FILE ...]
    if len(sys.argv) < 3 or sys.argv[1] != "upgrade":
        print(f"usage: {UPGRADE_COMMAND} FILE [FILE ...]", file=sys.stderr)
        sys.exit(2)
    for name in sys.argv[2:]:
        print(f"upgraded {upgrade_model_file(name)}")
