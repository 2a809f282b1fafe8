"""The shared training loop: a step learns, a stopped run resumes bit for bit, SIGTERM checkpoints."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import tiny_method_config

from CounterfactualVALib.methods import TrainingContext, create_method
from CounterfactualVATrainingLib.loop import CHECKPOINT_NAME, TrainingConfig, train

PRE_2D = {"spatial_dims": 2, "size": [32, 32], "spacing": [1.0, 1.0], "crop": "image", "intensity": "minmax"}


def _config(data, out, steps, **kw):
    return TrainingConfig(
        method="vantgan", data=str(data), out=str(out), preprocessing=PRE_2D, method_config=tiny_method_config(),
        steps=steps, val_every=kw.pop("val_every", 100), checkpoint_every=kw.pop("checkpoint_every", 100), command="pytest", **kw,
    )


def test_one_step_gives_finite_losses_and_changes_every_network():
    method = create_method("vantgan", 2, tiny_method_config(), training=True)
    before = {k: [p.detach().clone() for p in v.parameters()] for k, v in method.networks.items()}
    optimizers = {k: v[0] for k, v in method.configure_optimizers(10).items()}
    ctx = TrainingContext(torch.device("cpu"), optimizers)
    g = torch.Generator().manual_seed(0)
    batch = {"normal": torch.rand(1, 1, 32, 32, generator=g) * 2 - 1, "abnormal": torch.rand(1, 1, 32, 32, generator=g) * 2 - 1}
    losses = method.training_step(batch, ctx)
    assert all(torch.isfinite(torch.tensor(v)) for v in losses.values())
    for name, net in method.networks.items():
        changed = any(not torch.equal(a, b) for a, b in zip(before[name], net.parameters()))
        assert changed, f"{name} did not change"


def test_stopped_run_resumes_to_the_same_weights(synthetic_2d, tmp_path):
    straight = tmp_path / "straight"
    train(_config(synthetic_2d, straight, 6))
    stopped = tmp_path / "stopped"
    calls = {"n": 0}

    def stop_after_three():
        calls["n"] += 1
        return calls["n"] > 3

    assert train(_config(synthetic_2d, stopped, 6), should_stop=stop_after_three) is None  # cancelled
    assert torch.load(stopped / CHECKPOINT_NAME, weights_only=True)["step"] == 3
    train(_config(synthetic_2d, stopped, 6, resume=True))
    a = torch.load(straight / CHECKPOINT_NAME, weights_only=True)["networks"]
    b = torch.load(stopped / CHECKPOINT_NAME, weights_only=True)["networks"]
    for net in a:
        for key in a[net]:
            assert torch.equal(a[net][key], b[net][key]), f"{net}.{key} differs after resume"


def test_resume_refuses_other_settings(synthetic_2d, tmp_path):
    train(_config(synthetic_2d, tmp_path, 2))
    other = _config(synthetic_2d, tmp_path, 4, resume=True)
    other.method_config = {**other.method_config, "ngf": 16}
    with pytest.raises(ValueError, match="method_config"):
        train(other)


def test_one_class_cohort_is_refused(tmp_path, synthetic_2d):
    lines = Path(synthetic_2d).read_text().splitlines()
    header, rows = lines[0], [r for r in lines[1:] if r.split(",")[1] == "0"]
    csv = Path(synthetic_2d).parent / "normals_only.csv"
    csv.write_text("\n".join([header] + rows) + "\n")
    with pytest.raises(ValueError, match="one class|class 1|both classes|Both classes"):
        train(_config(csv, tmp_path / "run", 2))


def test_sigterm_stops_cleanly_with_a_checkpoint_and_resume_finishes(synthetic_2d, tmp_path):
    out = tmp_path / "run"
    cmd = [
        sys.executable, "-m", "CounterfactualVACLI", "train", "--method", "vantgan", "--data", str(synthetic_2d), "--out", str(out),
        "--steps", "400", "--spatial-dims", "2", "--size", "32", "32", "--spacing", "1", "1", "--crop", "image", "--intensity", "minmax",
        "--config", "ngf=8", "--config", "n_blocks=2", "--config", "ndf=8", "--checkpoint-every", "1000", "--val-every", "1000", "--progress",
    ]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    for line in proc.stdout:
        if line.startswith("PROGRESS") and "step 5/" in line:
            break
        assert time.time() < deadline
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 3, err
    assert "--resume" in err
    step = int(torch.load(out / CHECKPOINT_NAME, weights_only=True)["step"])
    assert 5 <= step < 400
    assert not list(out.glob("*.tmp"))
    done = subprocess.run(cmd[:cmd.index("--steps") + 1] + [str(step + 2)] + cmd[cmd.index("--steps") + 2 :] + ["--resume"], capture_output=True, text=True)
    # a different --steps changes the LR schedule: the loop still resumes, since only method/preprocessing/config must match
    assert done.returncode == 0, done.stderr
    assert (out / "model.safetensors").exists()
