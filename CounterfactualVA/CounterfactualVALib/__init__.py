"""CounterfactualVA library: counterfactual ("healthy counterpart") visual attribution for brain MRI.

Importable without Slicer or Qt. torch and MONAI are imported lazily by the modules that need them,
so that `import CounterfactualVALib` stays cheap for the Slicer module at start-up.
"""

__version__ = "0.1.0"
