"""MONAI dictionary transforms around :mod:`.preprocessing`, so training data goes through the very code
that inference uses. Keys: "image" (a path or SimpleITK image), optional "mask" (a binary mask or a signed
ground-truth difference map, path or image)."""

from __future__ import annotations

import numpy as np
import SimpleITK as sitk
from monai.transforms import MapTransform

from .imageio import read_image
from .preprocessing import PreprocessingConfig, preprocess, preprocess_companion


class LoadPreprocessd(MapTransform):
    """Read `image_key` and bring it onto the model grid; bring `mask_key` along on the same grid.

    Adds "<image_key>_state" (the :class:`PreprocessState` as a dict). Masks: an integer image is treated
    as a label (nearest neighbour), a float image as a difference map in the image's intensity units
    (linear, converted to model units).
    """

    def __init__(self, config: PreprocessingConfig, image_key: str = "image", mask_key: str | None = "mask", allow_missing_keys: bool = True):
        super().__init__([image_key] + ([mask_key] if mask_key else []), allow_missing_keys)
        self.config = config
        self.image_key = image_key
        self.mask_key = mask_key

    def __call__(self, data):
        d = dict(data)
        source = d[self.image_key]
        image = source if isinstance(source, sitk.Image) else read_image(source)
        array, state = preprocess(image, self.config, name=str(source) if not isinstance(source, sitk.Image) else "image")
        d[self.image_key] = array[None]  # channel first
        d[f"{self.image_key}_state"] = state.to_dict()
        mask_source = d.get(self.mask_key) if self.mask_key else None
        if mask_source:
            mask = mask_source if isinstance(mask_source, sitk.Image) else read_image(mask_source)
            if mask.GetDimension() == 3 and self.config.spatial_dims == 2 and 1 in mask.GetSize():
                size = list(mask.GetSize())
                size[size.index(1)] = 0
                mask = sitk.Extract(mask, size, [0, 0, 0])
            is_label = mask.GetPixelID() in (sitk.sitkUInt8, sitk.sitkInt8, sitk.sitkUInt16, sitk.sitkInt16, sitk.sitkUInt32, sitk.sitkInt32)
            d[self.mask_key] = preprocess_companion(mask, state, "label" if is_label else "difference")[None].astype(np.float32)
        elif self.mask_key:
            d[self.mask_key] = np.zeros_like(d[self.image_key])
        return d
