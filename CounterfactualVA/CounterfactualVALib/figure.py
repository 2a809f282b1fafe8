"""The PNG overview: the scan with the signed map overlaid, in three orthogonal planes (or one for 2D).

Slices pass through the voxel of largest |map|, so the figure shows the strongest finding. Pixels are
drawn with the physical aspect ratio of the input's spacing. Only the three shown slices are copied out of
the volumes (a 1 mm T1 has 9 million voxels; the figure shows about 130,000 of them).
"""

from __future__ import annotations

import numpy as np
import SimpleITK as sitk

from .atomic import atomic_path


def _planes(array: np.ndarray, spacing_xyz, centre_zyx):
    """(name, 2D slice, aspect) per plane; array is (z, y, x)."""
    if array.ndim == 2:
        return [("image", array, spacing_xyz[1] / spacing_xyz[0])]
    z, y, x = centre_zyx
    sx, sy, sz = spacing_xyz
    return [
        ("axial (k)", array[z], sy / sx),
        ("coronal (j)", array[:, y, :], sz / sx),
        ("sagittal (i)", array[:, :, x], sz / sy),
    ]


def strongest_voxel(attribution: np.ndarray, region: np.ndarray | None = None) -> tuple[tuple[int, ...], float]:
    """(index, |value|) of the largest |map| inside `region` (anywhere when there is none, or nothing inside)."""
    magnitude = np.abs(attribution)
    if region is not None and region.any():
        np.multiply(magnitude, region, out=magnitude)  # in place: one volume-sized buffer in all
    index = np.unravel_index(int(np.argmax(magnitude)), magnitude.shape)
    return tuple(int(i) for i in index), float(magnitude[index])


def save_overview_figure(
    path, image: sitk.Image, scan: np.ndarray, attribution: np.ndarray, mask: np.ndarray, title: str = "",
    region: np.ndarray | None = None, counterfactual: np.ndarray | None = None,
) -> None:
    """`scan`, `attribution`, `mask`, `counterfactual`: voxel arrays (numpy order) on `image`'s grid, whose
    spacing gives the aspect ratio. `region` (e.g. the head): the slices and colour scale follow the
    strongest finding inside it."""
    # The object API, not pyplot: no global figure state (this may run beside other threads) and a
    # lighter import.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    centre, vmax = strongest_voxel(attribution, region)
    vmax = vmax or float(np.abs(attribution).max()) or 1.0
    spacing = image.GetSpacing()
    planes = _planes(scan, spacing, centre)
    map_planes = _planes(attribution, spacing, centre)
    mask_planes = _planes(mask, spacing, centre)
    # Grey window from the shown slices (their 0.5-99.5 percentiles), not a pass over the whole volume.
    lo, hi = np.percentile(np.concatenate([np.ravel(p[1]) for p in planes]), [0.5, 99.5])
    rows = [("input + map", planes, True)]
    if counterfactual is not None:
        rows.append(("counterfactual", _planes(counterfactual, spacing, centre), False))
    fig = Figure(figsize=(3.2 * len(planes), 3.2 * len(rows)))
    FigureCanvasAgg(fig)
    axes = fig.subplots(len(rows), len(planes), squeeze=False)
    for r, (row_name, row_planes, overlay) in enumerate(rows):
        for c, ((plane_name, vol_slice, aspect), (_, map_slice, _), (_, mask_slice, _)) in enumerate(zip(row_planes, map_planes, mask_planes)):
            ax = axes[r, c]
            ax.imshow(vol_slice, cmap="gray", vmin=lo, vmax=hi, aspect=aspect, origin="lower", interpolation="nearest")
            if overlay:
                shown = np.ma.masked_where(np.abs(map_slice) < 0.2 * vmax, map_slice)  # faint differences stay uncoloured
                im = ax.imshow(shown, cmap="RdBu_r", vmin=-vmax, vmax=vmax, alpha=0.75, aspect=aspect, origin="lower", interpolation="nearest")
                if mask_slice.any() and min(mask_slice.shape) >= 2:  # contour needs a 2x2 grid
                    ax.contour(mask_slice, levels=[0.5], colors="yellow", linewidths=0.8)
            ax.set_title(f"{row_name}: {plane_name}", fontsize=8)
            ax.axis("off")
    fig.colorbar(im, ax=axes[0, :].tolist(), shrink=0.8, label="counterfactual - input")
    fig.suptitle(title, fontsize=9)
    with atomic_path(path, suffix=".png") as tmp:
        fig.savefig(tmp, dpi=110)
