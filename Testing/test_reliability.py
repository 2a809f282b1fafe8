"""Regression tests for the defects of issue 12, each reproducing the reported case first: every bad input
and every failure ends with exit 2 and one last `ERROR: <what> — <fix>` line, and damaged or edited files
are refused instead of explained."""

from __future__ import annotations

import gzip
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import SimpleITK as sitk
from reliability_support import (
    edit_model_metadata,
    join_model_file,
    last_line,
    run_cli_in_process,
    split_model_file,
    tiny_random_model,
)

from CounterfactualVALib.checkpoint import CHECKSUM_KEY, METADATA_KEY, ModelFileError, load_model_file, read_metadata, upgrade_model_file


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return tiny_random_model(tmp_path_factory.mktemp("model") / "tiny.safetensors")


@pytest.fixture(scope="module")
def scan(tmp_path_factory):
    """A small smooth 'head' (18x20x16) written as .nii.gz: big enough that a truncation cuts voxel data."""
    rng = np.random.default_rng(0)
    zz, yy, xx = np.meshgrid(*[np.linspace(-1, 1, n) for n in (16, 20, 18)], indexing="ij")
    array = (100 * (zz**2 + yy**2 + xx**2 < 0.7) + rng.normal(0, 3, zz.shape)).astype(np.float32)
    image = sitk.GetImageFromArray(array)
    image.SetSpacing((2.0, 2.0, 2.5))
    path = tmp_path_factory.mktemp("scan") / "scan.nii.gz"
    sitk.WriteImage(image, str(path), True)
    return path


def assert_refused(code, err, *fragments):
    line = last_line(err)
    assert code == 2, err
    assert line.startswith("ERROR: ") and " — " in line, line
    for fragment in fragments:
        assert fragment in line, line
    assert "Traceback (most recent call last)" not in err


# --- 1. truncated / corrupt compressed input ---------------------------------------------------------------


@pytest.mark.parametrize("keep", [0.5, 0.95, 200])
def test_truncated_nii_gz_is_refused_not_read_as_zeros(model, scan, tmp_path, keep):
    data = scan.read_bytes()
    cut = tmp_path / "cut.nii.gz"
    cut.write_bytes(data[: int(len(data) * keep) if keep < 1 else keep])
    out = tmp_path / "out"
    code, _, err = run_cli_in_process("attribute", "--model", model, "--input", cut, "--out", out)
    assert_refused(code, err, "truncated")
    assert not out.exists()


def test_itk_alone_reads_a_truncated_nii_gz_with_zeros(scan, tmp_path):
    """Why the check exists: without it the missing part comes back as zeros and nothing is said."""
    cut = tmp_path / "cut.nii.gz"
    cut.write_bytes(scan.read_bytes()[: len(scan.read_bytes()) // 2])
    array = sitk.GetArrayFromImage(sitk.ReadImage(str(cut)))
    assert array.shape == (16, 20, 18) and (array[-4:] == 0).all()


@pytest.mark.parametrize("name", ["scan.nii", "scan.nrrd", "scan.mha"])
def test_truncated_files_of_every_format_are_refused(scan, tmp_path, name):
    from CounterfactualVALib.imageio import InputError, read_image

    path = tmp_path / name
    sitk.WriteImage(sitk.ReadImage(str(scan)), str(path), name != "scan.nii")
    data = path.read_bytes()
    path.write_bytes(data[: len(data) - 40])
    with pytest.raises(InputError, match="truncated"):
        read_image(path)


def test_corrupt_gzip_stream_is_refused(scan, tmp_path):
    from CounterfactualVALib.imageio import InputError, read_image

    data = bytearray(scan.read_bytes())
    data[len(data) // 2] ^= 0xFF
    bad = tmp_path / "flipped.nii.gz"
    bad.write_bytes(bytes(data))
    with pytest.raises(InputError, match="damaged|truncated"):
        read_image(bad)


# --- 2. NaN/Inf voxels ------------------------------------------------------------------------------------


@pytest.mark.parametrize("ext", [".nii", ".nii.gz", ".nrrd", ".mha"])
def test_nan_and_inf_voxels_are_found_in_every_format(model, scan, tmp_path, ext):
    image = sitk.ReadImage(str(scan))
    array = sitk.GetArrayFromImage(image)
    array[3, 4, 5], array[6, 7, 8] = np.nan, np.inf
    bad = sitk.GetImageFromArray(array)
    bad.CopyInformation(image)
    path = tmp_path / f"nan{ext}"
    sitk.WriteImage(bad, str(path))
    if ext.startswith(".nii"):  # the reason for the check: ITK's NIfTI reader turns both into 0
        assert np.isfinite(sitk.GetArrayFromImage(sitk.ReadImage(str(path)))).all()
    code, _, err = run_cli_in_process("attribute", "--model", model, "--input", path, "--out", tmp_path / "out")
    assert_refused(code, err, "2 NaN/Inf voxels")


# --- 3 and 7 are run-folder defects: Testing/test_run_folder.py ----------------------------------------------


# --- 4. tracebacks instead of an ERROR line -----------------------------------------------------------------


def test_one_slice_volume_for_a_3d_model_is_refused(model, tmp_path):
    one = tmp_path / "one.nii.gz"
    sitk.WriteImage(sitk.GetImageFromArray(np.random.default_rng(0).normal(size=(1, 20, 20)).astype(np.float32)), str(one))
    code, _, err = run_cli_in_process("attribute", "--model", model, "--input", one, "--out", tmp_path / "out")
    assert_refused(code, err, "single slice", "whole series")


def test_out_naming_an_existing_file_is_refused(model, scan, tmp_path):
    target = tmp_path / "results.txt"
    target.write_text("keep me")
    code, _, err = run_cli_in_process("attribute", "--model", model, "--input", scan, "--out", target)
    assert_refused(code, err, str(target))
    assert target.read_text() == "keep me"


@pytest.mark.parametrize(
    "edit, fragment",
    [
        (lambda m: m["preprocessing"].update(size=[0, 8, 8]), "grid size"),
        (lambda m: m["preprocessing"].update(size=[-8, 8, 8]), "grid size"),
        (lambda m: m["preprocessing"].update(size=[4096, 4096, 4096]), "grid size"),
        (lambda m: m["preprocessing"].update(spacing=[0.0, 4.0, 4.0]), "spacing"),
        (lambda m: m["preprocessing"].update(spacing=[-4.0, 4.0, 4.0]), "spacing"),
        (lambda m: m["preprocessing"].update(interpolation="cubic-ish"), "interpolation"),
        (lambda m: m["preprocessing"].update(percentiles=[99.5, 0.5]), "percentiles"),
        (lambda m: m["preprocessing"].update(size="big"), "size"),
        (lambda m: m.update(normal_class=True), "normal_class"),
        (lambda m: m.update(normal_class=1.0), "normal_class"),
        (lambda m: m.update(format_version="abc"), "format_version"),
        (lambda m: m.update(networks="a2m"), "networks"),
        (lambda m: m.update(attribute_options=[{"name": "x", "type": "tensor"}]), "attribute_options"),
        (lambda m: m.update(attribute_options="all"), "attribute_options"),
    ],
)
def test_every_metadata_value_is_checked_with_its_reason(model, scan, tmp_path, edit, fragment):
    edited = edit_model_metadata(model, tmp_path / "edited.safetensors", edit, restamp=True)
    code, _, err = run_cli_in_process("attribute", "--model", edited, "--input", scan, "--out", tmp_path / "out")
    assert_refused(code, err, fragment)
    assert "invalid literal" not in err


@pytest.mark.parametrize(
    "edit, fragments",
    [
        (lambda m: m["method_config"].pop("ngf"), ["its method configuration lacks ['ngf']", "do not fit the stored weights", "retrain"]),
        (lambda m: m["preprocessing"].pop("spatial_dims"), ["preprocessing lacks ['spatial_dims']", "retrain"]),
        (lambda m: m["method_config"].update(ngf=0), ["vantgan: ngf must be between 1 and", "retrain"]),
        (lambda m: m["method_config"].update(ngff=8), ["unknown configuration keys ['ngff']", "retrain"]),
    ],
    ids=["missing width", "missing grid key", "width out of range", "unknown key"],
)
def test_a_restamped_model_with_an_incomplete_or_bad_configuration_is_refused_by_key(model, scan, tmp_path, edit, fragments):
    """A hand-edited header whose checksum was re-stamped used to reach the networks unchecked ('internal error')."""
    edited = edit_model_metadata(model, tmp_path / "edited.safetensors", edit, restamp=True)
    code, _, err = run_cli_in_process("attribute", "--model", edited, "--input", scan, "--out", tmp_path / "out", "--no-figure")
    assert_refused(code, err, *fragments)
    assert "internal error" not in err and not (tmp_path / "out").exists()


def test_a_model_lacking_keys_whose_defaults_fit_its_weights_still_explains_the_same(model, scan, tmp_path):
    """Keys a file does not state get this version's defaults when the weights fit them (files written before a
    key existed): training-only keys, and architecture keys whose default is the value trained with."""
    def drop(metadata):
        for key in ("lr", "pool_size", "generator", "unet_upsample", "n_downsampling"):  # n_downsampling: 2, the default
            metadata["method_config"].pop(key)

    edited = edit_model_metadata(model, tmp_path / "edited.safetensors", drop, restamp=True)
    maps = []
    for name, path in (("original", model), ("edited", edited)):
        code, _, err = run_cli_in_process("attribute", "--model", path, "--input", scan, "--out", tmp_path / name, "--no-figure")
        assert code == 0, err
        maps.append(sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / name / "scan_attribution.nii.gz"))))
    np.testing.assert_array_equal(maps[0], maps[1])
    assert np.abs(maps[0]).max() > 0


def test_unexpected_errors_end_with_an_error_line_and_a_logged_traceback(model, scan, tmp_path, monkeypatch):
    import CounterfactualVALib.inference as inference

    def broken(*args, **kwargs):
        raise KeyError("a bug")

    monkeypatch.setattr(inference, "run_attribution", broken)
    out = tmp_path / "out"
    out.mkdir()
    code, _, err = run_cli_in_process("attribute", "--model", model, "--input", scan, "--out", out)
    assert_refused(code, err, "internal error", "KeyError", str(out / "counterfactualva-error.log"))
    log = (out / "counterfactualva-error.log").read_text()
    assert "Traceback" in log and "raise KeyError" in log
    # no output folder yet: none is made for the log; the traceback goes to the temporary folder, named in the line
    code, _, err = run_cli_in_process("attribute", "--model", model, "--input", scan, "--out", tmp_path / "new")
    assert code == 2 and not (tmp_path / "new").exists()
    named = last_line(err).split("traceback in ")[1].split(" (rerun")[0]
    assert "raise KeyError" in open(named).read()
    os.remove(named)
    code, _, err = run_cli_in_process("attribute", "--model", model, "--input", scan, "--out", out, "--debug")
    assert code == 2 and "Traceback (most recent call last)" in err and last_line(err).startswith("ERROR: internal error")


def test_argument_errors_also_end_with_an_error_line(model):
    code, _, err = run_cli_in_process("attribute", "--model", model, "--device", "tpu")
    assert_refused(code, err, "--device", "--help")


# --- 5. the checksum covers metadata and weights, and is required -------------------------------------------


def test_changed_weight_is_refused(model, tmp_path):
    header, data = split_model_file(model)
    data = bytearray(data)
    data[-1] ^= 0x01
    path = join_model_file(tmp_path / "w.safetensors", header, bytes(data))
    with pytest.raises(ModelFileError, match="do not match the file's checksum"):
        load_model_file(path)


@pytest.mark.parametrize(
    "edit",
    [
        lambda m: m["preprocessing"].update(size=[10, 8, 8]),
        lambda m: m["preprocessing"].update(percentiles=[1.0, 99.0]),
        lambda m: m.update(normal_class=1),
        lambda m: m.update(classes=["abnormal", "normal"]),
    ],
)
def test_edited_metadata_is_refused_by_the_checksum(model, tmp_path, edit):
    path = edit_model_metadata(model, tmp_path / "m.safetensors", edit)  # valid values, old checksum
    read_metadata(path)  # the values alone are plausible
    with pytest.raises(ModelFileError, match="do not match the file's checksum"):
        load_model_file(path)


def test_checksum_cannot_be_switched_off(model, tmp_path):
    header, data = split_model_file(model)
    for value in ("", None):
        edited = json.loads(json.dumps(header))
        if value is None:
            del edited["__metadata__"][CHECKSUM_KEY]
        else:
            edited["__metadata__"][CHECKSUM_KEY] = value
        path = join_model_file(tmp_path / "m.safetensors", edited, data)
        with pytest.raises(ModelFileError, match="checksum"):
            load_model_file(path)


def test_format_1_files_are_refused_with_the_upgrade_command_which_keeps_the_weights(model, tmp_path):
    from safetensors.torch import load_file

    from CounterfactualVALib.checkpoint import weights_digest

    header, data = split_model_file(model)
    metadata = json.loads(header["__metadata__"].pop(CHECKSUM_KEY) and header["__metadata__"][METADATA_KEY])
    metadata["format_version"] = 1
    metadata["weights_sha256"] = weights_digest(load_file(str(model)))
    header["__metadata__"][METADATA_KEY] = json.dumps(metadata)
    old = join_model_file(tmp_path / "old.safetensors", header, data)
    with pytest.raises(ModelFileError, match="format 1 model file.*upgrade it once"):
        read_metadata(old)
    upgrade_model_file(old)
    assert split_model_file(old)[1] == data  # weights byte for byte
    assert read_metadata(old).format_version == 2 and load_model_file(old)
    # a format 1 file whose weights checksum was blanked (the old bypass) cannot be upgraded
    metadata["weights_sha256"] = ""
    header["__metadata__"][METADATA_KEY] = json.dumps(metadata)
    blank = join_model_file(tmp_path / "blank.safetensors", header, data)
    with pytest.raises(ModelFileError, match="cannot be vouched for"):
        upgrade_model_file(blank)


# --- 6. threshold values are checked before the pipeline runs ----------------------------------------------


@pytest.mark.parametrize(
    "rule, value, fragment",
    [("absolute", "-5", "positive finite"), ("absolute", "inf", "positive finite"), ("absolute", "nan", "positive finite"),
     ("percentile", "101", "[0, 100]"), ("paper", "0", "(0, 1]"), ("max-fraction", "nan", "(0, 1]")],
)
def test_threshold_values_are_refused_before_anything_is_read(model, tmp_path, rule, value, fragment):
    missing_input = tmp_path / "not-read.nii.gz"  # never reached: the threshold is checked first
    code, _, err = run_cli_in_process(
        "attribute", "--model", model, "--input", missing_input, "--out", tmp_path / "out", "--threshold-rule", rule, "--threshold-value", value
    )
    assert_refused(code, err, fragment)


def test_absolute_threshold_without_value_is_refused(model, scan, tmp_path):
    code, _, err = run_cli_in_process("attribute", "--model", model, "--input", scan, "--out", tmp_path / "o", "--threshold-rule", "absolute")
    assert_refused(code, err, "--threshold-value")


# --- 8. messages name the option or file and the fix -------------------------------------------------------


@pytest.mark.parametrize("option", ["ig_steps=abc", "ig_steps=2.5", "samples=3"])
def test_bad_method_option_names_the_option(scan, tmp_path, option):
    classifier = tiny_random_model(tmp_path / "classifier.safetensors", method_name="classifier")
    code, _, err = run_cli_in_process("attribute", "--model", classifier, "--input", scan, "--out", tmp_path / "o", "--option", option)
    assert_refused(code, err, option.split("=")[0], "--option")
    assert "invalid literal" not in err


def test_evaluate_without_split_column_says_so(model, scan, tmp_path):
    csv = tmp_path / "cohort.csv"
    mask = tmp_path / "mask.nii.gz"
    sitk.WriteImage(sitk.ReadImage(str(scan)) * 0, str(mask))
    csv.write_text("path,label,mask\n" + "".join(f"{scan},{int(i < 10)},{mask if i < 10 else ''}\n" for i in range(14)))
    code, _, err = run_cli_in_process("evaluate", "--model", model, "--data", csv)
    assert_refused(code, err, "no 'split' column", "add a split column")


# --- through the real command line --------------------------------------------------------------------------


def test_real_command_line_truncated_input_and_unknown_command(model, scan, tmp_path):
    cut = tmp_path / "cut.nii.gz"
    cut.write_bytes(gzip.compress(b"\x00" * 10)[:15])
    result = subprocess.run(
        [sys.executable, "-m", "CounterfactualVACLI", "attribute", "--model", str(model), "--input", str(cut), "--out", str(tmp_path / "o")],
        capture_output=True, text=True,
    )
    assert result.returncode == 2 and last_line(result.stderr).startswith("ERROR: ") and "truncated" in last_line(result.stderr)
    result = subprocess.run([sys.executable, "-m", "CounterfactualVACLI", "explain"], capture_output=True, text=True)
    assert result.returncode == 2 and last_line(result.stderr).startswith("ERROR: ") and "invalid choice" in last_line(result.stderr)
