"""The training module's self-test body (what Slicer's 'Reload and Test' runs, and Testing/ under slicer-core)."""

from __future__ import annotations

import os
import shutil
import tempfile

import slicer

from CounterfactualVALib.slicer_support.testing import make_tiny_cohort, poll_until_done

from .training_data import MODEL_PATH_ATTRIBUTE

#: a VANT-GAN small enough for a CPU self-test
TINY_CONFIG = {"ngf": 8, "n_blocks": 2, "ndf": 8}


def tiny_training_run(test, logic, steps: int = 3):
    """Check a cohort written here, train a tiny 2D VANT-GAN for `steps` steps through the logic, polled like
    the panel's timer, and check the run with `test`'s assertions (a unittest.TestCase). Leaves
    ``test.process``, ``test.progress`` and ``test.log`` for callers."""
    folder = tempfile.mkdtemp(prefix="CounterfactualVATrainingTest-")
    try:
        csvPath = make_tiny_cohort(os.path.join(folder, "data"), n=24, size=32, seed=0)
        preview = logic.datasetPreview(csvPath=csvPath, spatialDims=2)
        test.assertEqual(preview["problems"], [])
        test.assertEqual(preview["counts"]["normal"] + preview["counts"]["abnormal"], 24)
        out = os.path.join(folder, "tinyrun")
        test.progress, test.log = [], []
        process = logic.train(
            csvPath, out, method="vantgan", steps=steps, spatialDims=2, size=(32, 32), spacing=(1, 1), crop="image",
            intensity="minmax", device="cpu", config=TINY_CONFIG, logEvery=1, valEvery=steps, checkpointEvery=steps,
            waitForCompletion=False, recordModel=False,
            progressCallback=lambda *args: test.progress.append(args), logCallback=test.log.append,
        )
        poll_until_done(test, process)
        test.process = process
        test.assertEqual(process.returncode, 0, "\n".join(test.log))
        test.assertTrue(os.path.isfile(process.modelPath))
        test.assertEqual([p[1] for p in test.progress], list(range(1, steps + 1)))
        test.assertEqual(process.tableNode.GetNumberOfRows(), steps)
        series = [process.chartNode.GetNthPlotSeriesNode(i) for i in range(process.chartNode.GetNumberOfPlotSeriesNodes())]
        test.assertIn("loss_g", [s.GetYColumnName() for s in series])
        test.assertEqual(process.tableNode.GetAttribute(MODEL_PATH_ATTRIBUTE), process.modelPath)
    finally:
        shutil.rmtree(folder, ignore_errors=True)
