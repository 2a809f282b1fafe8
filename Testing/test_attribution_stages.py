"""The attribution pipeline's named stages, each on its own, and the typed run summary they produce."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from CounterfactualVALib import inference
from CounterfactualVALib.metrics import threshold_map
from CounterfactualVALib.preprocessing import preprocess
from CounterfactualVALib.run_summary import SUMMARY_VERSION, OutputFiles, RunSummary, SummaryError, Thresholds

REPO = Path(__file__).resolve().parents[1]
SAMPLE_MODEL = REPO / "samples" / "vantgan_phantom3d.safetensors"
SAMPLE_SCAN = REPO / "samples" / "phantom_atrophy.nii.gz"


@pytest.fixture(scope="module")
def sample_model():
    return inference.load_model(SAMPLE_MODEL, "cpu")


def test_each_stage_alone_gives_what_the_next_one_needs(sample_model, tmp_path):
    config = sample_model.config
    assert sample_model.metadata.method == "vantgan" and sample_model.device.type == "cpu"

    source = inference.read_input(SAMPLE_SCAN)
    image = inference.validate_input(source, config, SAMPLE_SCAN)
    assert image.array.shape == sitk.GetArrayViewFromImage(source).shape[-3:]
    assert image.head is not None and 0 < image.head.mean() < 1  # a head-cropped model: the head, not the air

    model_input = inference.preprocess_input(image, config)
    expected, expected_state = preprocess(source, config)  # the one-call form training uses
    np.testing.assert_array_equal(model_input.array, expected)
    assert model_input.state == expected_state
    assert model_input.array.shape == tuple(reversed(config.size))

    result = inference.attribute(sample_model, model_input)
    assert tuple(result.attribution.shape[2:]) == model_input.array.shape

    outputs = inference.postprocess(result, model_input, image, config, "percentile", 99.0)
    assert set(outputs.images) == {"counterfactual", "attribution", "mask"}
    mask, threshold = threshold_map(outputs.attribution, "percentile", 99.0, foreground=image.head)
    assert outputs.threshold == threshold > 0
    np.testing.assert_array_equal(outputs.mask, mask)
    np.testing.assert_allclose(
        sitk.GetArrayViewFromImage(outputs.images["counterfactual"]), image.array + outputs.attribution, rtol=0, atol=0
    )

    seen_during_writes = []
    files, seconds = inference.write_outputs(
        outputs, tmp_path, "scan", ".nrrd", source, compress=False, meanwhile=lambda: seen_during_writes.append(threading.active_count())
    )
    assert seen_during_writes and seen_during_writes[0] > 1  # `meanwhile` ran while the writer threads existed
    assert set(seconds) == {files.counterfactual, files.attribution, files.mask}
    written = sitk.ReadImage(str(tmp_path / files.attribution))
    np.testing.assert_array_equal(sitk.GetArrayViewFromImage(written), outputs.attribution)
    assert "encoding: raw" in (tmp_path / files.attribution).read_bytes()[:1000].decode("latin-1")


def test_a_loaded_model_gives_the_maps_a_fresh_run_gives(sample_model, tmp_path):
    fresh = inference.run_attribution(SAMPLE_MODEL, SAMPLE_SCAN, tmp_path / "fresh", device="cpu", figure=False)
    warm = [inference.run_attribution(sample_model, SAMPLE_SCAN, tmp_path / f"warm{i}", figure=False) for i in range(2)]
    for role in ("counterfactual", "attribution", "mask"):
        reference = (tmp_path / "fresh" / getattr(fresh.outputs, role)).read_bytes()
        for i, summary in enumerate(warm):
            assert (tmp_path / f"warm{i}" / getattr(summary.outputs, role)).read_bytes() == reference, role
    assert warm[0].timings_s["load_model"] == 0.0 < fresh.timings_s["load_model"]
    assert list(fresh.timings_s) == [*inference.STAGES, "total"]


def test_the_sample_run_never_imports_monai(tmp_path):
    """Importing MONAI loads its whole package (seconds): a VANT-GAN attribution must not pay for it."""
    code = (
        "import sys; from CounterfactualVALib.inference import run_attribution; "
        f"run_attribution({str(SAMPLE_MODEL)!r}, {str(SAMPLE_SCAN)!r}, {str(tmp_path)!r}, device='cpu', figure=False); "
        "print(sorted(m for m in sys.modules if m.split('.')[0] == 'monai'))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_the_summary_round_trips_and_refuses_what_it_cannot_read(sample_model, tmp_path):
    summary = inference.run_attribution(sample_model, SAMPLE_SCAN, tmp_path / "run", threshold_rule="absolute", threshold_value=0.05)
    read = RunSummary.read(tmp_path / "run")
    assert read == summary
    assert read.summary_version == SUMMARY_VERSION
    assert read.thresholds == Thresholds(rule="absolute", value=0.05, applied_to_abs_map=0.05)
    assert read.outputs.figure == "phantom_atrophy_figure.png" and (tmp_path / "run" / read.outputs.figure).is_file()
    assert set(read.write_s) == {*read.outputs.volumes().values(), read.outputs.figure}

    data = json.loads((tmp_path / "run" / "summary.json").read_text())
    legacy = {k: v for k, v in data.items() if k not in ("summary_version", "write_s")}  # written before versions
    assert RunSummary.from_dict(legacy) == replace(summary, write_s={})
    with pytest.raises(SummaryError, match=r"summary version 2, newer than .* reads \(1\).*update CounterfactualVA"):
        RunSummary.from_dict({**data, "summary_version": SUMMARY_VERSION + 1})
    with pytest.raises(SummaryError, match="lacks mask"):
        RunSummary.from_dict({**data, "outputs": {"attribution": "a.nii.gz"}})
    (tmp_path / "run" / "summary.json").write_text("{ cut off")
    with pytest.raises(SummaryError, match="cannot be read"):
        RunSummary.read(tmp_path / "run")
    with pytest.raises(SummaryError, match="without a summary"):
        RunSummary.read(tmp_path)


def test_output_files_list_every_volume():
    files = OutputFiles(attribution="a", mask="m", counterfactual=None, extras={"std": "s"}, extra_kinds={"std": "difference"}, series={"walk": "w"})
    assert files.volumes() == {"attribution": "a", "mask": "m", "extra:std": "s", "series:walk": "w"}
