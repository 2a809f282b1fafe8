"""`counterfactualva` command line, the top layer: it imports the runtime (CounterfactualVALib), and lazily the
training library (train) and the research harness (generate, evaluate, protocol). Nothing imports it."""
