"""Helpers shared by the reliability tests and the fuzz suite: a tiny random-weight model, header surgery on
model files, the CLI run in-process through its own error boundary, and a snapshot of a folder's files."""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import struct
from pathlib import Path

from CounterfactualVACLI import cli
from CounterfactualVALib.checkpoint import CHECKSUM_KEY, METADATA_KEY, ModelMetadata, model_checksum, save_model

TINY_CONFIGS = {"vantgan": {"ngf": 4, "n_blocks": 1, "ndf": 4}, "classifier": {"channels": 4, "n_layers": 2, "max_channels": 8}}


def tiny_random_model(path, spatial_dims: int = 3, size: int = 8, spacing: float = 4.0, seed: int = 0, method_name: str = "vantgan", **preprocessing) -> Path:
    """An untrained model (a few thousand weights) in a valid model file: enough to test I/O and geometry."""
    import torch

    from CounterfactualVALib.methods import create_method
    from CounterfactualVALib.preprocessing import PreprocessingConfig

    torch.manual_seed(seed)
    method = create_method(method_name, spatial_dims, dict(TINY_CONFIGS[method_name]))
    config = PreprocessingConfig(spatial_dims=spatial_dims, size=(size,) * spatial_dims, spacing=(spacing,) * spatial_dims, **preprocessing)
    metadata = ModelMetadata(
        method=method_name, method_config=method.config, preprocessing=config.to_dict(), networks=list(method.inference_networks), outputs=list(method.outputs)
    )
    return save_model(path, method.inference_state_dict(), metadata)


def split_model_file(path) -> tuple[dict, bytes]:
    """(safetensors header as a dict, tensor bytes)."""
    raw = Path(path).read_bytes()
    n = struct.unpack("<Q", raw[:8])[0]
    return json.loads(raw[8 : 8 + n]), raw[8 + n :]


def join_model_file(path, header: dict, data: bytes) -> Path:
    text = json.dumps(header).encode()
    text += b" " * ((8 - len(text) % 8) % 8)
    Path(path).write_bytes(struct.pack("<Q", len(text)) + text + data)
    return Path(path)


def edit_model_metadata(source, target, edit, restamp: bool = False) -> Path:
    """Copy `source` to `target` with `edit(metadata_dict)` applied to its metadata. restamp=True also writes
    a checksum that matches the edit (what a careful forger would do), so value checks are what must refuse it."""
    header, data = split_model_file(source)
    metadata = json.loads(header["__metadata__"][METADATA_KEY])
    edit(metadata)
    text = json.dumps(metadata, sort_keys=True)
    header["__metadata__"][METADATA_KEY] = text
    if restamp:
        from safetensors.torch import load_file

        header["__metadata__"][CHECKSUM_KEY] = model_checksum(text, load_file(str(source)))
    return join_model_file(target, header, data)


def run_cli_in_process(*args) -> tuple[int, str, str]:
    """(exit code, stdout, stderr) of `counterfactualva ARGS` run through cli.main, the same entry point and
    error boundary as the installed command."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = cli.main([str(a) for a in args])
    return code, out.getvalue(), err.getvalue()


def last_line(text: str) -> str:
    lines = [line for line in text.strip().splitlines() if line.strip()]
    return lines[-1] if lines else ""


def folder_digest(folder) -> dict[str, str]:
    """relative path -> SHA-256 of every file under `folder` (to show inputs are never modified)."""
    folder = Path(folder)
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.rglob("*")) if p.is_file()
    }


def leftover_temporaries(*folders) -> list[str]:
    """Temporary files and staging folders our atomic writers make (`.tmp-*`, `.staging-*`)."""
    found = []
    for folder in folders:
        if os.path.isdir(folder):
            found += [str(p) for p in Path(folder).rglob("*") if p.name.startswith((".tmp-", ".staging-"))]
    return found
