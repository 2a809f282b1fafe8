"""Runs inside the fresh virtual environment of test_requirements_env.py (not a test module itself).

Usage: ``python requirements_env_driver.py PLAN.json REPORT.json``. The plan lists command lines of the
command line tool (``python -m CounterfactualVACLI ...``, what the Slicer modules run); each is run here
through ``CounterfactualVACLI.cli.main`` in this one process (one interpreter start and one torch import for
all of them), and the report records, per command, its exit code (or the exception it raised, traceback
included) and its stderr, plus where the environment's packages come from.
"""

from __future__ import annotations

import contextlib
import importlib.util
import io
import json
import sys
import time
import traceback


def _origin(name: str) -> str | None:
    spec = importlib.util.find_spec(name)
    return spec.origin if spec is not None else None


def main(plan_path: str, report_path: str) -> int:
    with open(plan_path, encoding="utf-8") as f:
        plan = json.load(f)
    report = {
        "prefix": sys.prefix,
        "base_prefix": sys.base_prefix,
        "origins": {name: _origin(name) for name in ("torch", "CounterfactualVALib", "CounterfactualVATrainingLib", "CounterfactualVACLI", "CounterfactualVAResearch")},
        "runs": [],
    }
    from CounterfactualVACLI.cli import main as cli_main

    for run in plan["runs"]:
        stderr = io.StringIO()
        start = time.perf_counter()
        try:
            with contextlib.redirect_stderr(stderr):
                code = cli_main(run["argv"])
        except BaseException as exc:  # noqa: BLE001 - a missing package surfaces here as ModuleNotFoundError
            code = f"{type(exc).__name__}: {exc}"
            stderr.write(traceback.format_exc())
        report["runs"].append({"name": run["name"], "code": code, "seconds": round(time.perf_counter() - start, 2), "stderr": stderr.getvalue()[-4000:]})
    with open(report_path, "w", encoding="utf-8") as f:
        json.dump(report, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:3]))
