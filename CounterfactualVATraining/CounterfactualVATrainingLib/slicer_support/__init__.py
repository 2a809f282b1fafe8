"""The training module's Slicer side, Qt-free: what only CounterfactualVATraining needs, on top of the shared
layer in :mod:`CounterfactualVALib.slicer_support` (imports point down: this package may use the runtime's
support layer and the training library; neither of them imports this package).

- :mod:`.training_data` - the cohort check before training and the live log table / loss chart (MRML).
- :mod:`.training_process` - the ``train`` child process on the shared ProcessRunner and the record of
  trained models.

The command line never imports it (it needs slicer-core's MRML).
"""
