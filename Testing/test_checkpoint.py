"""Model files are data from strangers: pickles, tampering, foreign files and wrong methods are refused."""

from __future__ import annotations

import json
import shutil
import struct

import pytest
import torch

from CounterfactualVALib.checkpoint import ModelFileError, load_model_file, read_metadata, save_model
from CounterfactualVALib.inference import run_attribution


def test_metadata_describes_how_to_feed_the_model(tiny_2d_model):
    metadata = read_metadata(tiny_2d_model)
    assert metadata.method == "vantgan"
    assert metadata.preprocessing["size"] == [32, 32]
    assert metadata.classes[metadata.normal_class] == "normal"
    assert metadata.networks == ["a2m"]
    assert metadata.training["command"] == "pytest tiny_2d_model"
    assert "normal" in metadata.training["data_summary"]
    _, tensors = load_model_file(tiny_2d_model)
    assert all(name.startswith("a2m.") for name in tensors)  # only the inference network ships


def test_pickled_checkpoint_is_refused_without_unpickling(tmp_path):
    marker = tmp_path / "executed"

    class Evil:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    path = tmp_path / "model.pt"
    torch.save({"x": Evil()}, path)
    with pytest.raises(ModelFileError, match="pickled PyTorch checkpoint"):
        read_metadata(path)
    assert not marker.exists()


def test_bare_pickle_is_refused_and_a_header_length_starting_with_0x80_is_not_mistaken_for_one(tiny_2d_model, tmp_path):
    """Pickles start with PROTO 0x80; so does a safetensors file whose header length is 128 mod 256 (a real
    model file hit this). The container check must tell them apart."""
    import pickle

    bare = tmp_path / "bare.pkl"
    bare.write_bytes(pickle.dumps({"weights": [1.0, 2.0]}, protocol=4))
    with pytest.raises(ModelFileError, match="pickled PyTorch checkpoint"):
        read_metadata(bare)
    metadata = read_metadata(tiny_2d_model)
    _, tensors = load_model_file(tiny_2d_model)
    for pad in range(256):
        metadata.training["note"] = "x" * pad
        path = save_model(tmp_path / "model.safetensors", tensors, metadata)
        if path.read_bytes()[0] == 0x80:
            break
    else:
        pytest.fail("no padding gave a header length of 128 mod 256")
    assert read_metadata(path).training["note"] == "x" * pad
    loaded_metadata, loaded = load_model_file(path)
    assert all(torch.equal(loaded[k], tensors[k]) for k in tensors)


@pytest.mark.parametrize(
    "change, message",
    [
        ({"classes": ["normal", "mild", "severe"]}, "explains two-class models"),
        ({"classes": ["normal", "normal"]}, "explains two-class models"),
        ({"normal_class": 2}, "normal_class 2 does not index"),
        ({"preprocessing": {"spatial_dims": 3, "size": [32, 32], "spacing": [1.0, 1.0]}}, "not a valid 2D or 3D grid"),
    ],
)
def test_models_whose_classes_or_grid_do_not_fit_are_refused(tiny_2d_model, tmp_path, change, message):
    metadata = read_metadata(tiny_2d_model)
    _, tensors = load_model_file(tiny_2d_model)
    for key, value in change.items():
        setattr(metadata, key, value if key != "preprocessing" else {**metadata.preprocessing, **value})
    path = save_model(tmp_path / "odd.safetensors", tensors, metadata)
    with pytest.raises(ModelFileError, match=message):
        read_metadata(path)


def test_tampered_weights_fail_the_checksum(tiny_2d_model, tmp_path):
    path = tmp_path / "tampered.safetensors"
    shutil.copy(tiny_2d_model, path)
    data = bytearray(path.read_bytes())
    data[-8:] = bytes(8)  # overwrite the last weights' bytes
    path.write_bytes(bytes(data))
    with pytest.raises(ModelFileError, match="checksum"):
        load_model_file(path)


def test_edited_metadata_is_refused(tiny_2d_model, tmp_path):
    raw = bytearray(open(tiny_2d_model, "rb").read())
    n = struct.unpack("<Q", raw[:8])[0]
    header = json.loads(raw[8 : 8 + n])
    meta = json.loads(header["__metadata__"]["counterfactualva"])
    meta["method"] = "deepdream"
    header["__metadata__"]["counterfactualva"] = json.dumps(meta)
    new_header = json.dumps(header).encode()
    new_header += b" " * ((8 - len(new_header) % 8) % 8)
    path = tmp_path / "edited.safetensors"
    path.write_bytes(struct.pack("<Q", len(new_header)) + new_header + raw[8 + n :])
    with pytest.raises(ModelFileError, match="method 'deepdream'.*does not know"):
        read_metadata(path)


def test_foreign_and_truncated_files_are_refused(tmp_path, tiny_2d_model):
    from safetensors.torch import save_file

    foreign = tmp_path / "foreign.safetensors"
    save_file({"w": torch.zeros(2)}, str(foreign))
    with pytest.raises(ModelFileError, match="not a CounterfactualVA model"):
        read_metadata(foreign)
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(open(tiny_2d_model, "rb").read()[:100])
    with pytest.raises(ModelFileError):
        load_model_file(truncated)
    text = tmp_path / "notes.safetensors"
    text.write_text("hello world, not a model")
    with pytest.raises(ModelFileError):
        read_metadata(text)


def test_model_of_another_method_is_refused_when_one_is_expected(tiny_2d_model):
    with pytest.raises(ModelFileError, match="is a vantgan model, but a icam model was asked for"):
        load_model_file(tiny_2d_model, expected_method="icam")


def test_failed_run_leaves_nothing_behind(tiny_2d_model, tmp_path):
    bad = tmp_path / "model.pt"
    torch.save({"a": torch.zeros(1)}, bad)
    out = tmp_path / "out"
    image = tmp_path / "in.nii.gz"
    import numpy as np
    import SimpleITK as sitk

    sitk.WriteImage(sitk.GetImageFromArray(np.random.default_rng(0).normal(size=(32, 32)).astype(np.float32)), str(image))
    with pytest.raises(ModelFileError):
        run_attribution(bad, image, out)
    assert not out.exists() or not any(out.iterdir())


def test_save_is_atomic_and_digest_covers_every_tensor(tmp_path):
    from CounterfactualVALib.checkpoint import ModelMetadata

    meta = ModelMetadata(method="vantgan", method_config={}, preprocessing={"spatial_dims": 2, "size": [8, 8], "spacing": [1.0, 1.0]})
    path = save_model(tmp_path / "m.safetensors", {"a2m.w": torch.ones(3)}, meta)
    assert [p.name for p in tmp_path.iterdir()] == ["m.safetensors"]
    from safetensors import safe_open

    from CounterfactualVALib.checkpoint import CHECKSUM_KEY

    def checksum(p):
        with safe_open(str(p), framework="pt") as f:
            return f.metadata()[CHECKSUM_KEY]

    save_model(tmp_path / "m2.safetensors", {"a2m.w": torch.tensor([1.0, 1.0, 1.0001])}, meta)
    assert checksum(tmp_path / "m2.safetensors") != checksum(path)


def test_loaded_weights_do_not_depend_on_the_file_afterwards(tmp_path):
    """The weights are parsed from one in-memory read of the file, not from a memory map: a model file replaced
    or truncated in place after (or while) it is loaded must not change or crash what was loaded (a mapped file
    truncated under a reader is a SIGBUS that kills the Slicer worker)."""
    import shutil

    from CounterfactualVALib.checkpoint import load_model_file

    from pathlib import Path

    sample = Path(__file__).resolve().parents[1] / "samples" / "vantgan_phantom3d.safetensors"
    model = tmp_path / "model.safetensors"
    shutil.copy(sample, model)
    _, tensors = load_model_file(model)
    before = {name: t.clone() for name, t in tensors.items()}
    model.write_bytes(b"")  # truncated in place
    assert all(torch.equal(tensors[name], before[name]) for name in before)
    assert sum(float(t.float().abs().sum()) for t in tensors.values()) > 0
