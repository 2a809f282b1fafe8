"""The warm worker: its JSON-lines protocol in-process, and the real process through WorkerClient."""

from __future__ import annotations

import json
import os
import shutil
import threading
import time
from pathlib import Path

import pytest

from CounterfactualVALib.inference import run_attribution
from CounterfactualVALib.run_summary import RunSummary
from CounterfactualVALib.worker import WorkerClient, WorkerError, parse_event, serve

REPO = Path(__file__).resolve().parents[1]
SAMPLE_MODEL = REPO / "samples" / "vantgan_phantom3d.safetensors"
SAMPLE_SCAN = REPO / "samples" / "phantom_atrophy.nii.gz"


def run_protocol(lines, idle_timeout=30.0):
    """Serve `lines` in this process; returns (events, progress lines, why it ended)."""
    emitted = []
    reason = serve(iter(lines), emitted.append, idle_timeout)
    events = [parse_event(line) for line in emitted if parse_event(line)]
    progress = [line for line in emitted if line.startswith("PROGRESS ")]
    return events, progress, reason


def request(request_id, out, **extra):
    return json.dumps({"id": request_id, "command": "attribute", "model": str(SAMPLE_MODEL), "input": str(SAMPLE_SCAN), "out": str(out), "figure": False, **extra})


def test_the_protocol_loads_a_model_once_and_answers_every_request(tmp_path):
    model_copy = tmp_path / "copy.safetensors"
    shutil.copy(SAMPLE_MODEL, model_copy)
    lines = [
        request("a", tmp_path / "a"),
        request("b", tmp_path / "b", threshold_rule="percentile", threshold_value=98.0),
        "not json",
        json.dumps({"id": "c", "command": "attribute", "model": str(SAMPLE_MODEL)}),
        json.dumps({"id": "d", "command": "explain"}),
        request("e", tmp_path / "e", model=str(model_copy)),
        json.dumps({"id": "f", "command": "release"}),
        request("g", tmp_path / "g", model=str(model_copy)),
        json.dumps({"command": "shutdown"}),
        request("never", tmp_path / "never"),
    ]
    events, progress, reason = run_protocol(lines)
    assert reason == "shutdown"
    assert events[0]["event"] == "ready" and events[0]["protocol"] == 1
    answers = {e["id"]: e for e in events[1:-1]}
    assert answers["a"]["event"] == "done" and answers["a"]["model_was_loaded"] is True
    assert answers["b"]["event"] == "done" and answers["b"]["model_was_loaded"] is False  # the same model file: kept
    assert RunSummary.read(tmp_path / "b").thresholds.rule == "percentile"
    assert answers[None]["event"] == "error" and "one JSON object per line" in answers[None]["message"]
    assert answers["c"]["event"] == "error" and "lacks ['input', 'out']" in answers["c"]["message"] and answers["c"]["kind"] == "input"
    assert answers["d"]["event"] == "error" and "Unknown command 'explain'" in answers["d"]["message"]
    assert answers["e"]["model_was_loaded"] is True  # another file
    assert answers["f"]["event"] == "released"
    assert answers["g"]["model_was_loaded"] is True  # loaded again after release
    assert "never" not in answers and not (tmp_path / "never").exists()
    assert events[-1] == {"event": "exit", "reason": "shutdown"}
    assert any(line.startswith("PROGRESS 1.000 Done") for line in progress)
    # the warm runs write what a fresh run writes, byte for byte
    fresh = run_attribution(SAMPLE_MODEL, SAMPLE_SCAN, tmp_path / "fresh", device="auto", figure=False)
    for role, name in fresh.outputs.volumes().items():
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "fresh" / name).read_bytes(), role


def test_a_replaced_model_file_is_loaded_again_and_a_bad_request_leaves_the_worker_running(tmp_path):
    model = tmp_path / "model.safetensors"
    shutil.copy(SAMPLE_MODEL, model)
    first = request("1", tmp_path / "1", model=str(model))

    def lines():
        yield first
        yield request("2", tmp_path / "2", input=str(tmp_path / "missing.nii.gz"))
        # the file is replaced between requests (a newer export): the worker must not keep the old weights
        # (replaced as exports replace it, by a rename: a copy over the file in place can race the worker's
        # reload of request 2, which then reads a half-written file and fails for the wrong reason)
        time.sleep(0.01)
        shutil.copy(SAMPLE_MODEL, tmp_path / "newer.safetensors")
        os.utime(tmp_path / "newer.safetensors", ns=(time.time_ns(), time.time_ns() + 10**9))
        os.replace(tmp_path / "newer.safetensors", model)
        yield request("3", tmp_path / "3", model=str(model))

    events, _, reason = run_protocol(lines())
    answers = {e.get("id"): e for e in events if e["event"] in ("done", "error")}
    assert reason == "end of input"
    assert answers["2"]["event"] == "error" and "missing.nii.gz" in answers["2"]["message"] and not answers["2"]["gpu"]
    assert answers["3"]["event"] == "done" and answers["3"]["model_was_loaded"] is True


def test_the_worker_exits_when_idle():
    never = threading.Event()

    def silent():
        never.wait()
        yield from ()

    start = time.monotonic()
    events, _, reason = run_protocol(silent(), idle_timeout=0.3)
    assert reason == "idle" and events[-1] == {"event": "exit", "reason": "idle"}
    assert time.monotonic() - start < 10
    never.set()


def test_the_client_keeps_one_worker_warm_and_cancel_ends_it(tmp_path):
    logged = []
    with WorkerClient(log=logged.append) as client:
        stages = []
        first = client.attribute(SAMPLE_MODEL, SAMPLE_SCAN, tmp_path / "1", progress=lambda f, s: stages.append((f, s)), figure=False)
        pid = client.pid
        second = client.attribute(SAMPLE_MODEL, SAMPLE_SCAN, tmp_path / "2", figure=False, device="cpu")
        assert client.pid == pid  # the same process answered both
        assert first.method == second.method == "vantgan" and second.timings_s["load_model"] == 0.0
        assert stages[-1] == (1.0, "Done") and [f for f, _ in stages] == sorted(f for f, _ in stages)

        with pytest.raises(WorkerError, match="Model file not found") as error:
            client.attribute(tmp_path / "none.safetensors", SAMPLE_SCAN, tmp_path / "3")
        assert error.value.kind == "input" and not error.value.gpu and client.pid == pid

        # cancel while a request runs: the worker is killed, the request fails at once, nothing is written
        cancelled = threading.Timer(0.05, client.cancel)
        cancelled.start()
        with pytest.raises(WorkerError, match="killed by signal|exited"):
            client.attribute(SAMPLE_MODEL, SAMPLE_SCAN, tmp_path / "4", method_options={}, timeout=120)
        cancelled.join()
        assert not client.running and not (tmp_path / "4" / "summary.json").exists()
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)

        again = client.attribute(SAMPLE_MODEL, SAMPLE_SCAN, tmp_path / "5", figure=False)  # a fresh worker
        assert client.pid != pid and again.mask_voxels == first.mask_voxels


def test_a_gpu_failure_falls_back_to_the_cpu_in_the_same_worker(tmp_path):
    torch = pytest.importorskip("torch")
    if torch.cuda.is_available():
        pytest.skip("a CUDA GPU is available here: nothing to fall back from")
    logged = []
    with WorkerClient(log=logged.append) as client:
        summary = client.attribute(SAMPLE_MODEL, SAMPLE_SCAN, tmp_path / "out", device="cuda", figure=False)
        assert "CPU" in summary.device
        assert any("running on the CPU instead" in line for line in logged)
        with pytest.raises(WorkerError, match="CUDA was requested") as error:
            client.attribute(SAMPLE_MODEL, SAMPLE_SCAN, tmp_path / "again", device="cuda", cpu_fallback=False)
        assert error.value.gpu
