"""Run folders are never lost (issue 12, defects 3 and 7): a finished run is not overwritten, two trainers
never share a folder, a killed run resumes to the same weights with a log that has every step once, and a
failed start leaves nothing behind."""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time

import pytest
from reliability_support import folder_digest, last_line, run_cli_in_process

from CounterfactualVATrainingLib.runfolder import LOCK_NAME, RunFolder, RunFolderError, log_rows_up_to

TINY = ["--spatial-dims", "2", "--size", "32", "32", "--spacing", "1", "1", "--crop", "image", "--intensity", "minmax",
        "--config", "ngf=4", "--config", "n_blocks=1", "--config", "ndf=4", "--val-every", "4", "--log-every", "1", "--device", "cpu"]
TIMING_COLUMNS = ("seconds", "step_seconds", "elapsed_seconds")


def train_args(data, out, steps=4, checkpoint_every=2, *extra):
    return ["train", "--method", "vantgan", "--data", data, "--out", out, "--steps", str(steps), "--checkpoint-every", str(checkpoint_every), *TINY, *extra]


def log_steps(folder):
    with open(folder / "log.csv", newline="") as f:
        return [int(row["step"]) for row in csv.DictReader(f)]


def log_without_timings(folder):
    with open(folder / "log.csv", newline="") as f:
        return [{k: v for k, v in row.items() if k not in TIMING_COLUMNS} for row in csv.DictReader(f)]


def model_weights(path):
    from safetensors.torch import load_file

    return load_file(str(path))


@pytest.fixture(scope="module")
def finished_run(synthetic_2d, tmp_path_factory):
    out = tmp_path_factory.mktemp("runs") / "finished"
    code, _, err = run_cli_in_process(*train_args(synthetic_2d, out))
    assert code == 0, err
    return out


# --- defect 3: a finished run is never overwritten, two trainers never share a folder -------------------------


def test_finished_run_is_refused_and_left_untouched(finished_run, synthetic_2d):
    before = folder_digest(finished_run)
    code, _, err = run_cli_in_process(*train_args(synthetic_2d, finished_run, 2))
    assert code == 2
    line = last_line(err)
    assert line.startswith("ERROR: ") and "already holds a training run" in line and "--resume" in line and "--overwrite" in line
    after = folder_digest(finished_run)
    assert "Traceback" in (finished_run / "counterfactualva-error.log").read_text()  # the failure's own log
    assert {k: v for k, v in after.items() if k != "counterfactualva-error.log"} == before


def test_overwrite_moves_the_old_run_aside(finished_run, synthetic_2d, tmp_path):
    import shutil

    run = tmp_path / "run"
    shutil.copytree(finished_run, run)
    before = folder_digest(run)
    code, _, err = run_cli_in_process(*train_args(synthetic_2d, run, 2, 2, "--overwrite"))
    assert code == 0, err
    [replaced] = [p for p in run.iterdir() if p.name.startswith("replaced-")]
    moved = folder_digest(replaced)
    for name in ("model.safetensors", "checkpoint.pt", "log.csv"):
        assert moved[name] == before[name]  # the old run, byte for byte
    assert log_steps(run) == [1, 2]  # the new run's own log
    assert not (run / LOCK_NAME).exists()


def test_second_trainer_is_refused_with_the_holders_pid_and_a_dead_holders_lock_is_taken_over(synthetic_2d, tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        (out / LOCK_NAME).write_text(json.dumps({"pid": holder.pid, "started": "earlier"}))
        code, _, err = run_cli_in_process(*train_args(synthetic_2d, out, 2))
        assert code == 2 and f"process {holder.pid}" in last_line(err) and "in use" in last_line(err)
        assert not (out / "log.csv").exists()
    finally:
        holder.kill()
        holder.wait()
    # the holder is gone (as after kill -9): its lock is stale and the next trainer takes it over
    code, _, err = run_cli_in_process(*train_args(synthetic_2d, out, 2))
    assert code == 0, err
    assert not (out / LOCK_NAME).exists() and log_steps(out) == [1, 2]


def test_lock_is_exclusive_within_one_machine(tmp_path):
    first = RunFolder(tmp_path / "run").open()
    try:
        with pytest.raises(RunFolderError, match=f"process {os.getpid()}|in use"):
            # the same process id counts as the holder only for its own RunFolder: simulate another live holder
            (tmp_path / "run" / LOCK_NAME).write_text(json.dumps({"pid": os.getppid(), "started": "now"}))
            RunFolder(tmp_path / "run").open()
    finally:
        first.close()


def test_concurrent_trainings_into_one_folder_one_is_refused(synthetic_2d, tmp_path):
    import CounterfactualVATrainingLib.loop  # noqa: F401 - imported before the race, not during it

    out = tmp_path / "run"
    command = [sys.executable, "-m", "CounterfactualVACLI", *map(str, train_args(synthetic_2d, out, 5000, 50))]
    first = subprocess.Popen(command, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 300
        while not (out / LOCK_NAME).exists() and first.poll() is None and time.monotonic() < deadline:
            time.sleep(0.01)
        # the first holds the lock from its start to its end: a second start is refused while it runs
        code, _, err = run_cli_in_process(*train_args(synthetic_2d, out, 5000, 50))
        assert first.poll() is None, first.stderr.read()
        assert code == 2 and "in use" in last_line(err) and f"process {first.pid}" in last_line(err), err
    finally:
        while first.poll() is None and not (out / "log.csv").exists() and time.monotonic() < deadline + 300:
            time.sleep(0.05)  # SIGTERM is a clean stop once training runs (before that it ends the process)
        first.send_signal(signal.SIGTERM)  # stops at the next step with a checkpoint (exit 3: resumable)
        first_err = first.communicate()[1]
    assert first.returncode == 3, first_err
    assert not (out / LOCK_NAME).exists()


# --- defect 7: resume after kill -9, temporary files, failed starts -------------------------------------------


def test_log_is_cut_back_to_the_checkpoint_step(tmp_path):
    log = tmp_path / "log.csv"
    log.write_text("step,loss\n1,0.5\n2,0.4\n3,0.3\n2,0.45\n4,0.2\n5,0.1\n6,0.0")  # a repeat, and a row cut mid-line
    rows = log_rows_up_to(log, 4)
    assert [row["step"] for row in rows] == ["1", "2", "3", "4"] and rows[1]["loss"] == "0.45"


def _train_in_forked_child(args):
    """cli.main in a forked copy of this process (no second start-up of torch), ended by its exit code."""
    import contextlib
    import io

    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        code = run_cli_in_process(*args)[0]
    os._exit(code)


def test_resume_after_sigkill_gives_the_uninterrupted_weights_and_log(synthetic_2d, tmp_path):
    """The short fault-injection check (benchmarks/fault_injection.py kills >= 20 times at random moments):
    kill -9 twice once the run has logged a few more steps, resume until finished, compare with an
    uninterrupted run."""
    import multiprocessing

    steps = 12
    reference = tmp_path / "reference"
    code, _, err = run_cli_in_process(*train_args(synthetic_2d, reference, steps, 3))
    assert code == 0, err
    out = tmp_path / "killed"
    fork = multiprocessing.get_context("fork")
    kills = 0
    for _attempt in range(8):
        resume = ["--resume"] if (out / "checkpoint.pt").exists() else []
        child = fork.Process(target=_train_in_forked_child, args=(train_args(synthetic_2d, out, steps, 3, *resume),))
        child.start()
        if kills < 2:
            logged = len(log_steps(out)) if (out / "log.csv").exists() else 0
            deadline = time.monotonic() + 300
            while child.is_alive() and time.monotonic() < deadline:
                if (out / "log.csv").exists() and len(log_steps(out)) >= logged + 4:
                    break
                time.sleep(0.01)
            if child.is_alive():
                os.kill(child.pid, signal.SIGKILL)
                kills += 1
        child.join()
        if child.exitcode == 0:
            break
        assert child.exitcode == -signal.SIGKILL, child.exitcode
    assert kills == 2 and child.exitcode == 0
    got, expected = model_weights(out / "model.safetensors"), model_weights(reference / "model.safetensors")
    assert all((got[k] == expected[k]).all() for k in expected)
    steps_logged = log_steps(out)
    assert steps_logged == sorted(set(steps_logged)) == list(range(1, steps + 1))
    assert log_without_timings(out) == log_without_timings(reference)
    assert not [p for p in out.iterdir() if p.name.startswith((".tmp-", LOCK_NAME))]


def test_stale_temporary_files_are_removed_at_start(finished_run, synthetic_2d, tmp_path):
    import shutil

    run = tmp_path / "run"
    shutil.copytree(finished_run, run)
    (run / ".tmp-abc123.pt").write_bytes(b"half a checkpoint")
    code, _, err = run_cli_in_process(*train_args(synthetic_2d, run, 4, 2, "--resume"))
    assert code == 0, err
    assert not list(run.glob(".tmp-*"))


@pytest.mark.parametrize("problem", ["missing csv", "bad config", "out is a file"])
def test_failed_start_leaves_no_folder(synthetic_2d, tmp_path, problem):
    out = tmp_path / "new" / "run"
    args = train_args(synthetic_2d, out, 2)
    if problem == "missing csv":
        args[args.index("--data") + 1] = str(tmp_path / "missing.csv")
    elif problem == "bad config":
        args += ["--config", "ngf=-3"]
    else:
        out = tmp_path / "file.txt"
        out.write_text("keep")
        args[args.index("--out") + 1] = str(out)
    code, _, err = run_cli_in_process(*args)
    assert code == 2 and last_line(err).startswith("ERROR: ") and " — " in last_line(err), err
    if problem == "out is a file":
        assert out.read_text() == "keep"
    else:
        assert not out.exists() and not (tmp_path / "new" / "run").exists()


def test_resume_without_checkpoint_is_refused(synthetic_2d, tmp_path):
    code, _, err = run_cli_in_process(*train_args(synthetic_2d, tmp_path / "nothing", 2, 2, "--resume"))
    assert code == 2 and "no checkpoint" in last_line(err)
    assert not (tmp_path / "nothing").exists()
