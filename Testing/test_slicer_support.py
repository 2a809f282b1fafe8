"""The Slicer support layer's Qt-free pieces (CounterfactualVALib.slicer_support): process runner, requirements,
settings keys and path history, model header and options form. No Slicer application and no torch needed."""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
import textwrap
import time
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "CounterfactualVA"))

from CounterfactualVALib.slicer_support import model_file, option_form, process, requirements, settings  # noqa: E402
from CounterfactualVALib.slicer_support.process import ProcessRunner  # noqa: E402

SAMPLE_MODEL = REPO / "samples" / "vantgan_phantom3d.safetensors"


# --- process runner ---------------------------------------------------------------------------------------


def script(tmp_path, body, name="child.py"):
    path = tmp_path / name
    path.write_text("import os, signal, subprocess, sys, time\n" + textwrap.dedent(body))
    return [sys.executable, "-u", str(path)]


def test_runner_streams_progress_and_lines_and_reports_the_exit_code(tmp_path):
    command = script(tmp_path, """
        print("PROGRESS 0.25 reading", flush=True)
        print("hello", flush=True)
        print("ERROR: the model is not usable", file=sys.stderr, flush=True)
        print("PROGRESS 2 done", flush=True)
        sys.exit(2)
    """)
    progress, lines = [], []
    runner = ProcessRunner(command, on_progress=lambda f, t: progress.append((f, t)), on_line=lambda line, s: lines.append((s, line)))
    assert runner.start().wait(timeout=30) == 2
    assert progress == [(0.25, "reading"), (1.0, "done")]  # clipped to 1
    assert ("out", "hello") in lines and ("err", "ERROR: the model is not usable") in lines
    assert runner.error_message("attribution process") == "the model is not usable"
    assert not runner.running


def alive(pid) -> bool:
    """Running (a zombie waiting for its reaper is not)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_poll_never_blocks_and_kill_reaches_the_whole_process_group(tmp_path):
    """The child starts a grandchild that holds the pipes (as the PythonSlicer launcher does): kill() returns
    at once, and both are gone."""
    pid_file = tmp_path / "grandchild.pid"
    command = script(tmp_path, f"""
        child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
        open({str(pid_file)!r}, "w").write(str(child.pid))
        print("PROGRESS 0.1 started", flush=True)
        time.sleep(60)
    """)
    stages = []
    runner = ProcessRunner(command, on_progress=lambda f, t: stages.append(t)).start()
    deadline = time.monotonic() + 30
    while not stages:
        start = time.monotonic()
        assert runner.poll() is None
        assert time.monotonic() - start < 0.1  # a poll is a drain, not a wait
        assert time.monotonic() < deadline
        time.sleep(0.02)
    grandchild = int(pid_file.read_text())
    start = time.monotonic()
    runner.kill()
    assert time.monotonic() - start < 0.5
    assert runner.wait(timeout=10) is not None and runner.returncode < 0
    time.sleep(0.2)
    assert not alive(grandchild)


def test_request_stop_lets_the_child_finish_its_step(tmp_path):
    """SIGTERM to the group: the training loop's handler finishes, writes its checkpoint and exits with 3."""
    command = script(tmp_path, """
        stop = []
        signal.signal(signal.SIGTERM, lambda *a: stop.append(1))
        print("PROGRESS 0.1 step 1/100", flush=True)
        while not stop:
            time.sleep(0.01)
        print("checkpoint written", flush=True)
        sys.exit(3)
    """)
    lines, stages = [], []
    runner = ProcessRunner(command, on_progress=lambda f, t: stages.append(t), on_line=lambda line, s: lines.append(line)).start()
    while not stages:
        runner.poll()
        time.sleep(0.02)
    runner.request_stop()
    assert runner.stop_requested and runner.wait(timeout=20) == 3
    assert lines == ["checkpoint written"]


def test_cpu_fallback_and_restart_run_the_same_command_on_the_cpu(tmp_path):
    command = script(tmp_path, "print(os.environ.get('CUDA_VISIBLE_DEVICES'), sys.argv[1:], flush=True)") + ["--device", "cuda"]
    lines = []
    runner = ProcessRunner(command, env=dict(os.environ), on_line=lambda line, s: lines.append(line)).start()
    assert runner.wait(timeout=30) == 0
    assert process.looks_like_gpu_problem("CUDA out of memory") and not process.looks_like_gpu_problem("file not found")
    runner.restart(*process.cpu_fallback(runner.command, runner.env))
    assert runner.wait(timeout=30) == 0
    assert lines[-1] == "-1 ['--device', 'cpu']"
    assert process.cpu_fallback(["x", "attribute"], {})[0] == ["x", "attribute", "--device", "cpu"]


def test_child_environment_puts_the_library_first_and_hides_the_gpu_for_cpu():
    env = process.child_environment(["/lib/a", "/lib/b"], "cpu", base={"PYTHONPATH": os.pathsep.join(["/x", "/lib/a"])})
    assert env["PYTHONPATH"].split(os.pathsep) == ["/lib/a", "/lib/b", "/x"]
    assert env["CUDA_VISIBLE_DEVICES"] == "-1" and env["PYTHONUNBUFFERED"] == "1"
    assert "CUDA_VISIBLE_DEVICES" not in process.child_environment([], "auto", base={})
    assert process.python_executable("/opt/py") == "/opt/py" and process.python_executable() == sys.executable


# --- requirements -----------------------------------------------------------------------------------------


def test_requirements_file_lists_what_the_command_line_imports():
    reqs = {r.name.lower(): r for r in requirements.load_requirements()}
    # captum: integrated gradients and the classifier's validation map; Pillow: the figure; tqdm: training
    for name in ("torch", "monai", "captum", "safetensors", "simpleitk", "numpy", "scipy", "pillow", "tqdm"):
        assert name in reqs, name
    torch, others = requirements.split_torch(list(reqs.values()))
    assert torch.name == "torch" and all(r.name != "torch" for r in others)
    # our torch minimum is at least what the installed monai asks for (else pip would pull a torch itself)
    from importlib.metadata import requires

    from packaging.requirements import Requirement

    monai_torch = next(Requirement(r) for r in requires("monai") if Requirement(r).name == "torch" and Requirement(r).marker is None)
    floor = min(s.version for s in monai_torch.specifier if s.operator in (">=", ">"))
    assert all(torch.specifier.contains(v) for v in (floor,)) and not torch.specifier.contains("2.7")


def test_unmet_requirements_are_found_from_metadata_without_importing(tmp_path, monkeypatch):
    path = tmp_path / "requirements.txt"
    path.write_text("# comment\n--extra-index-url x\ntorch>=2.8  # inline comment\nnumpy>=1.24\nnot-installed-pkg-xyz>=1\n")
    reqs = requirements.load_requirements(path)
    assert [str(r) for r in reqs] == ["torch>=2.8", "numpy>=1.24", "not-installed-pkg-xyz>=1"]
    assert requirements.unmet(reqs[0], "2.7.1") == "2.7.1 installed"
    assert requirements.unmet(reqs[0], "2.13.0+cpu") is None
    assert [(str(r), why) for r, why in requirements.missing_requirements(reqs)] == [("not-installed-pkg-xyz>=1", "not installed")]
    handler = requirements.DependencyHandler("Test", path, in_slicer=False)
    with pytest.raises(requirements.RequirementsError, match=r"not-installed-pkg-xyz>=1 \(not installed\).*pip install -r"):
        handler.ensure()
    path.write_text("numpy>=1.24\nnumpy>=>1\n")
    with pytest.raises(ValueError, match="line 2"):
        requirements.load_requirements(path)


# --- settings ---------------------------------------------------------------------------------------------


def path_line_edit_setting_keys(ui_file):
    keys = {}
    for widget in ET.parse(ui_file).iter("widget"):
        if widget.get("class") == "ctkPathLineEdit":
            for prop in widget.findall("property"):
                if prop.get("name") == "settingKey":
                    keys[widget.get("name")] = prop.find("string").text
    return keys


def test_model_history_is_written_where_the_panel_field_reads_it():
    """ctkPathLineEdit reads QSettings 'ctkPathLineEdit/<settingKey>' (CTK ctkPathLineEditPrivate::settingKey)."""
    keys = path_line_edit_setting_keys(REPO / "CounterfactualVA" / "Resources" / "UI" / "CounterfactualVA.ui")
    assert keys["modelPathLineEdit"] == settings.MODEL_PATH_FIELD
    store = settings.MemorySettings({"ctkPathLineEdit/" + settings.MODEL_PATH_FIELD: "/old/a.safetensors"})  # one entry: a str
    settings.remember_model(store, "/runs/b/model.safetensors")
    settings.remember_model(store, "/old/a.safetensors")
    assert store.value("ctkPathLineEdit/CounterfactualVA/ModelPathHistory") == ["/old/a.safetensors", "/runs/b/model.safetensors"]
    assert store.value(settings.LAST_MODEL_PATH) == "/old/a.safetensors"
    for _ in range(30):
        settings.add_to_path_history(store, "k", f"/p/{_}")
    assert len(settings.path_history(store, "k")) == settings.HISTORY_LIMIT and settings.path_history(store, "k")[0] == "/p/29"


def test_empty_paths_stay_empty_and_the_default_model_exists(tmp_path):
    assert settings.path_text(Path("")) == "" and settings.path_text(".") == "" and settings.path_text(None) == ""
    store = settings.MemorySettings({settings.LAST_MODEL_PATH: str(tmp_path / "deleted.safetensors")})
    assert settings.default_model(store) == ""
    assert settings.default_model(store, fallback=str(SAMPLE_MODEL)) == str(SAMPLE_MODEL)
    settings.add_to_path_history(store, settings.MODEL_PATH_FIELD, SAMPLE_MODEL)
    assert settings.default_model(store) == str(SAMPLE_MODEL)


# --- model header and options form ------------------------------------------------------------------------


def write_header(path, metadata, extra=b""):
    header = json.dumps({"__metadata__": {"counterfactualva": json.dumps(metadata)}}).encode()
    path.write_bytes(struct.pack("<Q", len(header)) + header + extra)
    return path


def test_model_header_is_read_without_torch():
    code = (
        "import sys; sys.path.insert(0, 'CounterfactualVA');"
        "from CounterfactualVALib.slicer_support import model_file, option_form;"
        "m = model_file.read_model_metadata('samples/vantgan_phantom3d.safetensors');"
        "option_form.option_specs_for_model_file('samples/vantgan_phantom3d.safetensors'); option_form.form_for_model_file('samples/vantgan_phantom3d.safetensors');"
        "print(m['method'], model_file.describe_model(m)[:40]);"
        "assert 'torch' not in sys.modules and 'safetensors' not in sys.modules and 'numpy' not in sys.modules, sorted(sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("vantgan vantgan (3D), model grid [40, 48, 40]")


def test_model_header_errors_say_what_is_wrong(tmp_path):
    from CounterfactualVALib.checkpoint import METADATA_KEY

    assert model_file.METADATA_KEY == METADATA_KEY
    (tmp_path / "zip.safetensors").write_bytes(b"PK\x03\x04" + b"\0" * 20)
    (tmp_path / "text.safetensors").write_text("hello, not a model")
    other = tmp_path / "other.safetensors"
    header = b'{"__metadata__": {"x": "1"}}'
    other.write_bytes(struct.pack("<Q", len(header)) + header)
    for name, message in (("zip", "pickled PyTorch"), ("text", "not a safetensors"), ("other", "not a CounterfactualVA model"), ("missing", "not found")):
        with pytest.raises(model_file.ModelHeaderError, match=message):
            model_file.read_model_metadata(tmp_path / f"{name}.safetensors")


ICAM_OPTIONS = [
    {"name": "samples", "type": "int", "default": 20, "label": "Latent samples", "tooltip": "t", "minimum": 1, "maximum": 1000},
    {"name": "direction", "type": "choice", "default": "to_normal", "label": "Direction", "tooltip": "t", "choices": ["to_normal", "to_abnormal", "auto"]},
    {"name": "seed", "type": "int", "default": 0, "label": "Seed", "tooltip": "t", "minimum": 0, "maximum": 2**31 - 1, "advanced": True, "future_field": 1},
]


def test_option_form_reads_specs_from_the_model_and_saves_changed_values_per_method(tmp_path):
    model = write_header(tmp_path / "icam.safetensors", {"method": "icam", "attribute_options": ICAM_OPTIONS})
    specs = option_form.option_specs_for_model_file(model)
    assert [s.name for s in specs] == ["samples", "direction", "seed"] and specs[1].choices == ("to_normal", "to_abnormal", "auto")
    form = option_form.OptionForm("icam", specs)
    assert form.options() == {} and form.saved_text() == "" and form.advanced_names == ["seed"]
    assert form.set("samples", 40.0) == 40  # a spin box's value arrives as a float
    form.set("direction", "auto")
    with pytest.raises(ValueError, match="between 1 and 1000"):
        form.set("samples", 0)
    with pytest.raises(ValueError, match="Unknown method option 'bogus'"):
        form.set("bogus", 1)
    assert form.options() == {"samples": 40, "direction": "auto"}
    saved = form.saved_text()
    assert json.loads(saved) == {"icam": {"direction": "auto", "samples": 40}}
    # another method's form keeps the icam values in the scene text; coming back restores them
    other = option_form.OptionForm("vantgan", [], saved)
    assert other.saved_text() == saved
    again = option_form.OptionForm("icam", specs, json.dumps({"icam": {"samples": 7, "direction": "sideways"}}))
    assert again.values == {"samples": 7, "direction": "to_normal", "seed": 0}  # a value no longer valid: default
    again.reset()
    assert again.options() == {} and again.saved_text() == ""
    assert option_form.OptionForm("icam", specs, "not json").values["samples"] == 20


def test_option_form_of_a_model_without_listed_options(tmp_path):
    assert option_form.option_specs_for_model_file(SAMPLE_MODEL) == []  # VANT-GAN takes no attribution options
    unknown = write_header(tmp_path / "unknown.safetensors", {"method": "no-such-method"})
    assert option_form.option_specs_for_model_file(unknown) == []  # the panel never asks the method registry


def test_option_editors_fit_their_specs(tmp_path):
    """What the panel builds per option row: the editor class, the range set before the value (Qt clamps a
    value to the current range: QSpinBox's own default 0..99 would turn max_candidates=20000 into 99), the
    decimals of a float, the choices, and the signal that reports an edit."""
    from CounterfactualVALib.method_options import OptionSpec

    specs = {s.name: s for s in option_form.option_specs_from_metadata({"method": "icam", "attribute_options": ICAM_OPTIONS})}
    samples = option_form.editor_for(specs["samples"])
    assert (samples.qt_class, samples.signal, samples.value_property) == ("QSpinBox", "valueChanged(int)", "value")
    assert list(samples.properties.items()) == [("minimum", 1), ("maximum", 1000)]
    direction = option_form.editor_for(specs["direction"])
    assert direction.qt_class == "QComboBox" and direction.items == ["to_normal", "to_abnormal", "auto"]
    assert direction.signal == "currentTextChanged(QString)" and option_form.editor_value(specs["direction"], "auto") == "auto"
    lr = OptionSpec("inversion_lr", "float", 0.01, "Learning rate", "t", minimum=1e-6, maximum=10.0, step=0.001)
    plan = option_form.editor_for(lr)
    assert list(plan.properties) == ["decimals", "singleStep", "minimum", "maximum"] and plan.properties["decimals"] == 4
    unbounded = option_form.editor_for(OptionSpec("n", "int", 5, "N", "t"))
    assert unbounded.properties == {"minimum": -(2**31 - 1), "maximum": 2**31 - 1}
    flag = OptionSpec("fast", "bool", False, "Fast", "t")
    assert option_form.editor_for(flag).value_property == "checked" and option_form.editor_value(flag, 1) is True
    for kind in option_form.EDITOR_CLASSES:  # every form type has an editor
        assert option_form.editor_for(OptionSpec("x", kind, "a" if kind in ("str", "choice") else 0, "X", "t", choices=("a",) if kind == "choice" else ())).qt_class


def test_options_form_for_a_model_file_says_why_it_has_no_rows(tmp_path):
    model = write_header(tmp_path / "icam.safetensors", {"method": "icam", "attribute_options": ICAM_OPTIONS})
    form, _message = option_form.form_for_model_file(str(model), json.dumps({"icam": {"samples": 9}}))
    assert form.method == "icam" and form.values["samples"] == 9
    form, message = option_form.form_for_model_file("")
    assert form.specs == [] and "Select a model file" in message
    form, message = option_form.form_for_model_file(str(tmp_path / "missing.safetensors"))
    assert form.specs == [] and message.startswith("Options not available") and "not found" in message
    assert model_file.model_info("") == "No model selected."
    assert model_file.model_info(str(tmp_path / "missing.safetensors")).startswith("Model file not found")
    assert model_file.model_info(str(SAMPLE_MODEL)).startswith("vantgan (3D), model grid")
    older = write_header(tmp_path / "older.safetensors", {"method": "icam"})  # written before options were listed
    form, message = option_form.form_for_model_file(str(older))
    assert form.specs == [] and "does not list" in message and option_form.option_specs_for_model_file(older) == []
    (tmp_path / "text.safetensors").write_text("hello")
    assert model_file.model_info(str(tmp_path / "text.safetensors")).startswith("Not usable:")


def test_sample_data_source_has_a_checksum_file_types_and_a_template_sized_thumbnail():
    import hashlib

    from PIL import Image

    from CounterfactualVALib.slicer_support import sample_data

    source = sample_data.sample_data_source(str(REPO / "CounterfactualVA"))
    scan = REPO / "samples" / sample_data.SAMPLE_SCAN
    assert source["checksums"] == "SHA256:" + hashlib.sha256(scan.read_bytes()).hexdigest()
    assert source["loadFileTypes"] == "VolumeFile" and "loadFileType" not in source
    assert source["uris"] == scan.resolve().as_uri() and source["fileNames"] == sample_data.SAMPLE_SCAN
    assert Image.open(source["thumbnailFileName"]).size == (260, 280)


def test_extension_index_files():
    entry_text = (REPO / "docs" / "CounterfactualVA.json").read_text()
    assert '"build_dependencies": [\n    "PyTorch"\n  ]' in entry_text  # arrays one item per line, as the index's prettier writes them
    assert (REPO / "LICENSE").read_text().startswith("\n                                 Apache License")
    import re

    description = re.search(r'set\(EXTENSION_DESCRIPTION "([^"]+)"\)', (REPO / "CMakeLists.txt").read_text()).group(1)
    assert description.count(". ") + 1 <= 2 and len(description) < 300
