"""What both Slicer modules share, Qt-free where it can be (and so tested without the application).

- :mod:`.framework` - the scripted-module framework names (stand-ins under slicer-core), the panels'
  parameter-node lifecycle, and the GUI connectors Slicer lacks (path fields as text, plain-text boxes).
- :mod:`.process` - :class:`~.process.ProcessRunner`: the child process (start, stream progress, stop/kill
  the process group, CPU fallback), the child's Python and environment.
- :mod:`.requirements` - what the child needs, from ``Resources/requirements.txt``, checked without imports
  and installed through the PyTorch extension and pip.
- :mod:`.settings` - settings keys and the ctkPathLineEdit history.
- :mod:`.option_form` / :mod:`.model_file` - the method-options form and the model header, without torch;
  :mod:`.option_rows` - the form's Qt rows (application only).
- :mod:`.attribution` / :mod:`.attribution_worker` / :mod:`.results` - the attribution run (command line or warm
  worker), a batch over volumes, and its results as nodes.
- :mod:`.device_probe` - which device the child will use, asked once in a child process.

Nothing here is imported by the library itself: the command line never needs it. What only the training
module needs is in ``CounterfactualVATrainingLib.slicer_support``, which builds on this package.
"""
