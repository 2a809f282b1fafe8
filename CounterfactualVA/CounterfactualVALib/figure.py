"""The PNG overview: the scan with the signed map overlaid, in three orthogonal planes (or one for 2D).

Slices pass through the voxel of largest |map|, so the figure shows the strongest finding. Pixels are
drawn with the physical aspect ratio of the input's spacing, at one millimetre-to-pixel scale for every
panel. Only the three shown slices are copied out of the volumes (a 1 mm T1 has 9 million voxels; the
figure shows about 130,000 of them).

The panels are composed with numpy and written with Pillow, not drawn by matplotlib: importing matplotlib
and drawing with it took 1.5 s of a 1 mm attribution that otherwise takes about 1 s in-process (issue 14),
for a picture that is only slices, a colour overlay, a contour and a few labels.
"""

from __future__ import annotations

import numpy as np
import SimpleITK as sitk

from .atomic import atomic_path

#: ColorBrewer's RdBu anchors, blue (negative: the counterfactual is darker) to red (brighter), the
#: colour scale of matplotlib's "RdBu_r", linearly interpolated between the eleven colours
DIVERGING_ANCHORS = np.array(
    [
        (5, 48, 97), (33, 102, 172), (67, 147, 195), (146, 197, 222), (209, 229, 240), (247, 247, 247),
        (253, 219, 199), (244, 165, 130), (214, 96, 77), (178, 24, 43), (103, 0, 31),
    ],
    dtype=np.float32,
)
#: the overlay's opacity, and the share of the largest |map| below which a voxel stays uncoloured
OVERLAY_ALPHA = 0.75
OVERLAY_FLOOR = 0.2
CONTOUR_RGB = (255, 255, 0)
#: the longest physical extent among the panels is drawn this many pixels long
PANEL_PIXELS = 260
TITLE_PIXELS = 16
MARGIN = 8


def _planes(array: np.ndarray, spacing_xyz, centre_zyx):
    """(name, 2D slice, (row spacing, column spacing)) per plane; array is (z, y, x)."""
    if array.ndim == 2:
        return [("image", array, (spacing_xyz[1], spacing_xyz[0]))]
    z, y, x = centre_zyx
    sx, sy, sz = spacing_xyz
    return [
        ("axial (k)", array[z], (sy, sx)),
        ("coronal (j)", array[:, y, :], (sz, sx)),
        ("sagittal (i)", array[:, :, x], (sz, sy)),
    ]


def strongest_voxel(attribution: np.ndarray, region: np.ndarray | None = None) -> tuple[tuple[int, ...], float]:
    """(index, |value|) of the largest |map| inside `region` (anywhere when there is none, or nothing inside)."""
    magnitude = np.abs(attribution)
    if region is not None and region.any():
        np.multiply(magnitude, region, out=magnitude)  # in place: one volume-sized buffer in all
    index = np.unravel_index(int(np.argmax(magnitude)), magnitude.shape)
    return tuple(int(i) for i in index), float(magnitude[index])


def diverging_colours(values: np.ndarray, vmax: float) -> np.ndarray:
    """RGB (float, 0-255) of `values` on the blue-white-red scale from -vmax to +vmax."""
    position = np.clip((values + vmax) / (2.0 * vmax), 0.0, 1.0) * (len(DIVERGING_ANCHORS) - 1)
    low = np.minimum(position.astype(np.int64), len(DIVERGING_ANCHORS) - 2)
    fraction = (position - low)[..., None]
    return DIVERGING_ANCHORS[low] * (1.0 - fraction) + DIVERGING_ANCHORS[low + 1] * fraction


def _resample_indices(n: int, spacing: float, scale: float) -> np.ndarray:
    """Source index of every output pixel along one axis (nearest neighbour, physical size x scale)."""
    pixels = max(1, int(round(n * spacing * scale)))
    return np.minimum(((np.arange(pixels) + 0.5) / pixels * n).astype(np.int64), n - 1)


def _outline(mask: np.ndarray) -> np.ndarray:
    """Pixels of `mask` with a 4-neighbour outside it (the mask's one-pixel contour)."""
    inner = mask.copy()
    inner[1:, :] &= mask[:-1, :]
    inner[:-1, :] &= mask[1:, :]
    inner[:, 1:] &= mask[:, :-1]
    inner[:, :-1] &= mask[:, 1:]
    inner[0, :] = inner[-1, :] = inner[:, 0] = inner[:, -1] = False
    return mask & ~inner


def render_panel(
    scan_slice: np.ndarray, map_slice: np.ndarray | None, mask_slice: np.ndarray | None, spacing_rc, scale: float,
    grey_window: tuple[float, float], vmax: float,
) -> np.ndarray:
    """One panel as an (rows, columns, 3) uint8 image, the first array row at the bottom (radiological
    slices are shown with the patient's inferior/posterior side down, as the earlier figure did)."""
    rows = _resample_indices(scan_slice.shape[0], spacing_rc[0], scale)[::-1]
    cols = _resample_indices(scan_slice.shape[1], spacing_rc[1], scale)
    lo, hi = grey_window
    grey = np.clip((scan_slice[np.ix_(rows, cols)].astype(np.float32) - lo) / max(hi - lo, 1e-12), 0.0, 1.0) * 255.0
    rgb = np.repeat(grey[..., None], 3, axis=-1)
    if map_slice is not None:
        shown = map_slice[np.ix_(rows, cols)].astype(np.float32)
        coloured = np.abs(shown) >= OVERLAY_FLOOR * vmax  # faint differences stay uncoloured
        rgb[coloured] = OVERLAY_ALPHA * diverging_colours(shown[coloured], vmax) + (1.0 - OVERLAY_ALPHA) * rgb[coloured]
    if mask_slice is not None and mask_slice.any():
        outline = _outline(mask_slice[np.ix_(rows, cols)] > 0)
        rgb[outline] = CONTOUR_RGB
    return rgb.astype(np.uint8)


def _font(size: int):
    from PIL import ImageFont

    try:
        return ImageFont.load_default(size=size)  # scalable where Pillow has FreeType
    except (TypeError, OSError, ImportError):
        return ImageFont.load_default()


def save_overview_figure(
    path, image: sitk.Image, scan: np.ndarray, attribution: np.ndarray, mask: np.ndarray, title: str = "",
    region: np.ndarray | None = None, counterfactual: np.ndarray | None = None,
) -> None:
    """`scan`, `attribution`, `mask`, `counterfactual`: voxel arrays (numpy order) on `image`'s grid, whose
    spacing gives the aspect ratio. `region` (e.g. the head): the slices and colour scale follow the
    strongest finding inside it. Rows: the input with the map and the mask's contour; the counterfactual."""
    from PIL import Image, ImageDraw

    centre, vmax = strongest_voxel(attribution, region)
    vmax = vmax or float(np.abs(attribution).max()) or 1.0
    spacing = image.GetSpacing()
    planes = _planes(scan, spacing, centre)
    map_planes = _planes(attribution, spacing, centre)
    mask_planes = _planes(mask, spacing, centre)
    # Grey window from the shown slices (their 0.5-99.5 percentiles), not a pass over the whole volume.
    lo, hi = np.percentile(np.concatenate([np.ravel(p[1]) for p in planes]), [0.5, 99.5])
    extent_mm = max(max(s.shape[0] * sp[0], s.shape[1] * sp[1]) for _, s, sp in planes)
    scale = PANEL_PIXELS / extent_mm

    rows = [("input + map", [render_panel(s, m, k, sp, scale, (lo, hi), vmax)
                             for (_, s, sp), (_, m, _), (_, k, _) in zip(planes, map_planes, mask_planes)])]
    if counterfactual is not None:
        rows.append(("counterfactual", [render_panel(s, None, None, sp, scale, (lo, hi), vmax)
                                        for _, s, sp in _planes(counterfactual, spacing, centre)]))

    font, small = _font(12), _font(10)
    column_widths = [max(row[1][c].shape[1] for row in rows) for c in range(len(planes))]
    row_heights = [max(panel.shape[0] for panel in row[1]) for row in rows]
    colourbar_width = 90
    width = MARGIN + sum(w + MARGIN for w in column_widths) + colourbar_width
    top = 2 * TITLE_PIXELS if title else MARGIN
    height = top + sum(h + TITLE_PIXELS + MARGIN for h in row_heights)
    canvas = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(canvas)
    if title:
        draw.text((width // 2, TITLE_PIXELS // 2 + 2), title, fill="black", font=font, anchor="mt")

    y = top
    for (row_name, panels), row_height in zip(rows, row_heights):
        x = MARGIN
        for (plane_name, _, _), panel, column_width in zip(planes, panels, column_widths):
            draw.text((x + column_width // 2, y + 2), f"{row_name}: {plane_name}", fill="black", font=small, anchor="mt")
            canvas.paste(Image.fromarray(panel), (x + (column_width - panel.shape[1]) // 2, y + TITLE_PIXELS))
            x += column_width + MARGIN
        y += row_height + TITLE_PIXELS + MARGIN

    # colour bar beside the first row: +vmax at the top, -vmax at the bottom
    bar_top, bar_height = top + TITLE_PIXELS, row_heights[0]
    levels = np.linspace(vmax, -vmax, bar_height, dtype=np.float32)[:, None].repeat(14, axis=1)
    bar = diverging_colours(levels, vmax).astype(np.uint8)
    bar_x = width - colourbar_width + 4
    canvas.paste(Image.fromarray(bar), (bar_x, bar_top))
    for value, row in ((vmax, 0), (0.0, bar_height // 2), (-vmax, bar_height - 1)):
        draw.text((bar_x + 18, bar_top + row), f"{value:+.3g}", fill="black", font=small, anchor="lm")
    draw.text((bar_x, bar_top + bar_height + 4), "counterfactual\n- input", fill="black", font=small)
    with atomic_path(path, suffix=".png") as tmp:
        canvas.save(tmp, format="PNG", compress_level=1)  # a few hundred kB at most; speed over size
