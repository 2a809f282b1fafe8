"""Cohort generation: the VA-GAN synthetic two-subtype set and a realistic 3D phantom cohort built from the
MNI152 template shipped with nilearn. Both write images, ground truth and a ``cohort.csv``
(``path,label,mask,subtype,split``) that :func:`CounterfactualVALib.cohort.read_cohort_csv` reads back.
"""

from .phantom import generate_phantom_cohort
from .synthetic import generate_synthetic

__all__ = ["generate_synthetic", "generate_phantom_cohort"]
