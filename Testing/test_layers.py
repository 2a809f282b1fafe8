"""The packages are layers and every import points down: runtime <- training <- research harness <- command
line. A module importing upwards (even lazily, inside a function) fails here with the file and line named."""

from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
#: package -> (folder, packages it must not import)
LAYERS = {
    "CounterfactualVALib": (REPO / "CounterfactualVA" / "CounterfactualVALib", {"CounterfactualVATrainingLib", "CounterfactualVAResearch", "CounterfactualVACLI"}),
    "CounterfactualVATrainingLib": (REPO / "CounterfactualVATraining" / "CounterfactualVATrainingLib", {"CounterfactualVAResearch", "CounterfactualVACLI"}),
    "CounterfactualVAResearch": (REPO / "CounterfactualVAResearch", {"CounterfactualVACLI"}),
}


def imported_packages(path: Path) -> list[tuple[str, int]]:
    """(top-level package, line) of every absolute import in a file, at any depth."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [(alias.name.split(".")[0], node.lineno) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.append((node.module.split(".")[0], node.lineno))
    return found


def test_every_import_points_down():
    upward = []
    for package, (folder, forbidden) in LAYERS.items():
        files = sorted(folder.rglob("*.py"))
        assert files, f"no modules found for {package} in {folder}"
        for path in files:
            upward += [f"{path.relative_to(REPO)}:{line} imports {name}" for name, line in imported_packages(path) if name in forbidden]
    assert upward == []


def test_the_harness_is_not_shipped_into_slicer():
    cmake = "\n".join(p.read_text() for p in REPO.rglob("CMakeLists.txt") if ".venv" not in p.parts)
    assert "CounterfactualVAResearch" not in cmake.replace("The research harness (CounterfactualVAResearch", "")
    assert "${MODULE_NAME}CLI/*.py" in (REPO / "CounterfactualVA" / "CMakeLists.txt").read_text()


def test_the_detector_sees_lazy_imports(tmp_path):
    module = tmp_path / "m.py"
    module.write_text("def f():\n    from CounterfactualVACLI.cli import main\n    import CounterfactualVAResearch.protocol\n")
    assert imported_packages(module) == [("CounterfactualVACLI", 2), ("CounterfactualVAResearch", 3)]
