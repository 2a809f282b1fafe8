"""The PNG overview: the scan with the signed map overlaid, in three orthogonal planes (or one for 2D).

Slices pass through the voxel of largest |map|, so the figure shows the strongest finding. Pixels are
drawn with the physical aspect ratio of the input's spacing.
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


def save_overview_figure(path, image: sitk.Image, attribution: sitk.Image, mask: sitk.Image, counterfactual: sitk.Image | None = None, title: str = "", region: np.ndarray | None = None) -> None:
    """`region` (e.g. the head): the slices and colour scale follow the strongest finding inside it."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    scan = sitk.GetArrayFromImage(image)
    amap = sitk.GetArrayFromImage(attribution)
    marr = sitk.GetArrayFromImage(mask)
    cf = sitk.GetArrayFromImage(counterfactual) if counterfactual is not None else None
    inside = np.abs(amap) * (region if region is not None else 1)
    centre = np.unravel_index(int(np.argmax(inside)), amap.shape)
    spacing = image.GetSpacing()
    vmax = float(inside.max()) or float(np.abs(amap).max()) or 1.0
    lo, hi = np.percentile(scan, [0.5, 99.5])
    rows = [("input + map", scan, True)] + ([("counterfactual", cf, False)] if cf is not None else [])
    planes = _planes(scan, spacing, centre)
    fig, axes = plt.subplots(len(rows), len(planes), figsize=(3.2 * len(planes), 3.2 * len(rows)), squeeze=False)
    for r, (row_name, volume, overlay) in enumerate(rows):
        for c, ((plane_name, _, aspect), (_, vol_slice, _), (_, map_slice, _), (_, mask_slice, _)) in enumerate(
            zip(planes, _planes(volume, spacing, centre), _planes(amap, spacing, centre), _planes(marr, spacing, centre))
        ):
            ax = axes[r, c]
            ax.imshow(vol_slice, cmap="gray", vmin=lo, vmax=hi, aspect=aspect, origin="lower", interpolation="nearest")
            if overlay:
                shown = np.ma.masked_where(np.abs(map_slice) < 0.2 * vmax, map_slice)  # faint differences stay uncoloured
                im = ax.imshow(shown, cmap="RdBu_r", vmin=-vmax, vmax=vmax, alpha=0.75, aspect=aspect, origin="lower", interpolation="nearest")
                if mask_slice.any():
                    ax.contour(mask_slice, levels=[0.5], colors="yellow", linewidths=0.8)
            ax.set_title(f"{row_name}: {plane_name}", fontsize=8)
            ax.axis("off")
    fig.colorbar(im, ax=axes[0, :].tolist(), shrink=0.8, label="counterfactual - input")
    fig.suptitle(title, fontsize=9)
    with atomic_path(path, suffix=".png") as tmp:
        fig.savefig(tmp, dpi=110)
    plt.close(fig)
