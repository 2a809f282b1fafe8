"""A model file's metadata read in the Slicer GUI process without torch, safetensors or numpy.

A safetensors file starts with an 8-byte little-endian header length and that many bytes of JSON; our
metadata is the JSON string under ``__metadata__["counterfactualva"]`` (see ``checkpoint.save_model``). The
panel reads it to describe the model and to build the method-options form, so opening the panel or
picking a model never imports torch or initialises CUDA in the GUI (the child process owns the GPU).
The full checks (weights checksum, known method, grid) still run in the child, by ``checkpoint``.
"""

from __future__ import annotations

import json
import os
import struct

#: ``checkpoint.METADATA_KEY`` (checked by Testing/test_slicer_support.py)
METADATA_KEY = "counterfactualva"
#: the metadata key of the method's attribution options (a list of OptionSpec fields), when the model has it
OPTIONS_KEY = "attribute_options"
#: headers larger than this are not model files (ours are a few kB)
MAX_HEADER_BYTES = 100 * 1024 * 1024


class ModelHeaderError(ValueError):
    """The file is not a readable CounterfactualVA model; the message says why and what to do."""


def read_model_metadata(path) -> dict:
    """The model's metadata dict (method, method_config, preprocessing, classes, ...)."""
    path = str(path or "")
    if not path or path == ".":
        raise ModelHeaderError("No model file selected.")
    if not os.path.isfile(path):
        raise ModelHeaderError(f"Model file not found: {path}.")
    with open(path, "rb") as f:
        head = f.read(9)
        if len(head) < 9:
            raise ModelHeaderError(f"{path} is too short to be a model file ({len(head)} bytes).")
        (length,) = struct.unpack("<Q", head[:8])
        if head[8:9] != b"{" or length > min(MAX_HEADER_BYTES, os.path.getsize(path) - 8):
            if head[:4] == b"PK\x03\x04" or (head[:1] == b"\x80" and head[1:2] in (b"\x02", b"\x03", b"\x04", b"\x05")):
                raise ModelHeaderError(f"{path} is a pickled PyTorch checkpoint, which CounterfactualVA does not load. Use a .safetensors model file.")
            raise ModelHeaderError(f"{path} is not a safetensors model file (unrecognised header).")
        f.seek(8)
        raw = f.read(length)
    try:
        header = json.loads(raw.decode("utf-8"))
        metadata = json.loads((header.get("__metadata__") or {})[METADATA_KEY])
    except KeyError:
        raise ModelHeaderError(f"{path} is a safetensors file but not a CounterfactualVA model (no '{METADATA_KEY}' metadata).") from None
    except (UnicodeDecodeError, ValueError, AttributeError, TypeError) as exc:
        raise ModelHeaderError(f"{path} has a damaged header ({exc}).") from None
    if not isinstance(metadata, dict) or not isinstance(metadata.get("method"), str):
        raise ModelHeaderError(f"{path}: the metadata names no method; the file was edited or written by another tool.")
    return metadata


def describe_model(metadata: dict) -> str:
    """One paragraph about a model for the panel: method, grid, classes, training."""
    pre = metadata.get("preprocessing") or {}
    training = metadata.get("training") or {}
    classes = metadata.get("classes") or []
    normal_index = metadata.get("normal_class", 0)
    normal = classes[normal_index] if isinstance(normal_index, int) and 0 <= normal_index < len(classes) else "?"
    outputs = metadata.get("outputs") or []
    text = (
        f"{metadata['method']} ({pre.get('spatial_dims', '?')}D), model grid {pre.get('size')} at {pre.get('spacing')} mm; "
        f"classes {classes} (normal: {normal}); trained {training.get('steps', '?')} steps on "
        f"{training.get('data_summary', 'unknown data')}."
    )
    return text + (f" Outputs: {', '.join(outputs)}." if outputs else "")


def model_info(path) -> str:
    """The panel's paragraph about the model file at `path` (from its header only), or what is wrong with it."""
    from .settings import path_text

    path = path_text(path)
    if not path:
        return "No model selected."
    if not os.path.isfile(path):
        return f"Model file not found: {path}"
    try:
        return describe_model(read_model_metadata(path))
    except ValueError as exc:
        return f"Not usable: {exc}"
