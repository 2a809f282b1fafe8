"""The overview PNG: slices through the strongest finding, physical aspect, signed colours, the mask's outline."""

from __future__ import annotations

import numpy as np
import SimpleITK as sitk
from PIL import Image

from CounterfactualVALib.figure import diverging_colours, render_panel, save_overview_figure


def _reddish(rgb):
    return rgb[..., 0].astype(int) - rgb[..., 2] > 40


def _bluish(rgb):
    return rgb[..., 2].astype(int) - rgb[..., 0] > 40


def test_colour_scale_runs_blue_to_white_to_red():
    colours = diverging_colours(np.array([-2.0, -1.0, 0.0, 1.0, 2.0], dtype=np.float32), vmax=1.0)
    np.testing.assert_allclose(colours[0], colours[1])  # clipped at -vmax
    assert colours[1, 2] > colours[1, 0] + 50 and colours[3, 0] > colours[3, 2] + 50
    assert colours[2].min() > 240  # zero is (near) white


def test_panel_keeps_physical_aspect_puts_the_first_row_at_the_bottom_and_outlines_the_mask():
    scan = np.zeros((10, 20), np.float32)
    scan[0] = 1.0  # the first array row: bright
    attribution = np.zeros_like(scan)
    attribution[4:7, 8:12] = 1.0
    mask = attribution > 0
    panel = render_panel(scan, attribution, mask, (3.0, 1.0), 4.0, (0.0, 1.0), 1.0)
    assert panel.shape == (120, 80, 3)  # 10 rows x 3 mm and 20 columns x 1 mm, at 4 pixels per mm
    assert panel[-1].mean() > 200 and panel[0].mean() < 10  # first row drawn at the bottom
    yellow = (panel[..., 0] > 200) & (panel[..., 1] > 200) & (panel[..., 2] < 50)
    assert yellow.any() and not yellow[60, 40]  # an outline, not a filled mask
    assert _reddish(panel)[60, 40]


def test_overview_shows_both_signs_in_the_map_row_and_none_in_the_counterfactual_row(tmp_path):
    rng = np.random.default_rng(0)
    scan = rng.normal(100.0, 5.0, size=(24, 32, 28)).astype(np.float32)
    attribution = np.zeros_like(scan)
    attribution[12, 10:14, 8:12] = 40.0  # the strongest finding (slices pass through it) ...
    attribution[12, 20:24, 16:20] = -30.0  # ... and a darker one in the same axial slice
    mask = (np.abs(attribution) > 0).astype(np.uint8)
    image = sitk.GetImageFromArray(scan)
    image.SetSpacing((1.0, 1.0, 2.0))
    path = tmp_path / "figure.png"
    save_overview_figure(path, image, scan, attribution, mask, "title", counterfactual=scan + attribution)
    rgb = np.asarray(Image.open(path).convert("RGB"))
    half = rgb.shape[0] // 2
    top, bottom = rgb[:half, : rgb.shape[1] - 90], rgb[half:, : rgb.shape[1] - 90]  # the colour bar stays out
    assert _reddish(top).sum() > 50 and _bluish(top).sum() > 20
    assert not _reddish(bottom).any() and not _bluish(bottom).any()
