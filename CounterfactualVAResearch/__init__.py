"""CounterfactualVA research harness: data generators (synthetic, MNI152 phantom), evaluation, the protocol
runner and its figure panels, and method checks. Used by the command line (generate, evaluate, protocol),
the tests and benchmarks/; not installed into Slicer. May import CounterfactualVALib and
CounterfactualVATrainingLib; neither imports it."""
