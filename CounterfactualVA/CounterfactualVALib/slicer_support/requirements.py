"""What the command line needs in Slicer's Python, read from one file: ``CounterfactualVA/Resources/requirements.txt``.

The file is the single source of truth (pyproject's ``dependencies`` repeat it and a test checks they agree;
the requirements test installs exactly it into a fresh virtual environment and runs every method there).
Its ``torch`` line is the minimum PyTorch, which in Slicer is installed or upgraded through the PyTorch
extension (``PyTorchUtils``, the way SlicerMONAIAuto3DSeg and SlicerTotalSegmentator do it), never by pip
behind its back; every other line goes to pip: ``slicer.packaging.pip_ensure`` where Slicer has it (5.12),
``slicer.util.pip_install`` after our own confirmation on 5.10.

Checking never imports a package (versions come from the installed distributions' metadata), so the
panel can check without loading torch or CUDA into the GUI process.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import logging
import os

try:
    from packaging.requirements import InvalidRequirement, Requirement
    from packaging.version import InvalidVersion, Version
except ImportError:  # pragma: no cover - Slicer 5.10's Python: the copy vendored by pip
    from pip._vendor.packaging.requirements import InvalidRequirement, Requirement
    from pip._vendor.packaging.version import InvalidVersion, Version

#: CounterfactualVA/Resources/requirements.txt (this file is CounterfactualVA/CounterfactualVALib/slicer_support/requirements.py)
REQUIREMENTS_FILE = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "Resources", "requirements.txt")
#: installed through the PyTorch extension, not pip
TORCH = "torch"


class RequirementsError(RuntimeError):
    """A requirement cannot be met here; the message says what to do."""


def load_requirements(path: str | os.PathLike = REQUIREMENTS_FILE) -> list[Requirement]:
    """The requirement lines of a requirements file (comments, blank lines and pip options skipped, as
    ``slicer.packaging.load_requirements`` reads them). ValueError names the line that does not parse."""
    requirements = []
    with open(path, encoding="utf-8") as f:
        for number, raw in enumerate(f, 1):
            line = raw.split(" #", 1)[0].strip()
            if not line or line.startswith("#") or line.startswith("-"):
                continue
            try:
                requirements.append(Requirement(line))
            except InvalidRequirement as exc:
                raise ValueError(f"{path}, line {number}: {line!r} is not a requirement ({exc}).") from None
    return requirements


def split_torch(requirements: list[Requirement]) -> tuple[Requirement | None, list[Requirement]]:
    """(the torch requirement or None, the pip requirements)."""
    torch = next((r for r in requirements if r.name.lower() == TORCH), None)
    return torch, [r for r in requirements if r.name.lower() != TORCH]


def installed_version(name: str) -> str | None:
    """The installed distribution's version, None when not installed; nothing is imported."""
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def unmet(requirement: Requirement, version: str | None = None) -> str | None:
    """Why `requirement` is not met ("not installed", "1.2 installed"), None when it is. `version`: the
    installed version (default: looked up); markers that do not apply here count as met."""
    if requirement.marker is not None and not requirement.marker.evaluate():
        return None
    version = installed_version(requirement.name) if version is None else version
    if version is None:
        return "not installed"
    try:
        ok = requirement.specifier.contains(Version(version), prereleases=True)
    except InvalidVersion:
        ok = True  # a local build with an odd version string: trust it
    return None if ok else f"{version} installed"


def missing_requirements(requirements: list[Requirement] | None = None) -> list[tuple[Requirement, str]]:
    """[(requirement, why)] of the requirements not met in this Python (default: the requirements file)."""
    requirements = load_requirements() if requirements is None else requirements
    return [(r, why) for r in requirements for why in [unmet(r)] if why is not None]


def describe_missing(missing: list[tuple[Requirement, str]]) -> str:
    return ", ".join(f"{r} ({why})" for r, why in missing)


def check_installed(panel: str, button: str, console: str) -> None:
    """RuntimeError naming what is missing and how to install it (the `button` of the `panel`, or the `console`
    call), before a child process is launched that would fail on it."""
    missing = missing_requirements()
    if missing:
        raise RuntimeError(f"Python packages missing: {describe_missing(missing)}. In Slicer click {button} in the {panel} panel "
                           f"(it offers to install them) or call {console}.")


class DependencyHandler:
    """Installs what the requirements file lists into Slicer's Python, asking first. One per module call.

    ``ensure()`` returns True when everything is met, False when the user declined; RequirementsError when
    something cannot be installed from here (no PyTorch extension, outside the Slicer application)."""

    def __init__(self, requester: str, requirements_file: str | os.PathLike = REQUIREMENTS_FILE, in_slicer: bool = True):
        self.requester = requester
        self.requirements_file = str(requirements_file)
        self.in_slicer = in_slicer

    def requirements(self) -> list[Requirement]:
        return load_requirements(self.requirements_file)

    def missing(self) -> list[tuple[Requirement, str]]:
        return missing_requirements(self.requirements())

    def ensure(self, ask_confirmation: bool = True) -> bool:
        missing = self.missing()
        if not missing:
            return True
        if not self.in_slicer:
            raise RequirementsError(
                f"Python packages missing: {describe_missing(missing)}. Install them with "
                f"`pip install -r {self.requirements_file}` (PyTorch: `pip install torch`)."
            )
        torch, pip_requirements = split_torch([r for r, _why in missing])
        if torch is not None and not self._ensure_torch(torch, ask_confirmation):
            return False
        if pip_requirements and not self._pip_ensure(pip_requirements, ask_confirmation):
            return False
        importlib.invalidate_caches()
        still = self.missing()
        if still:
            raise RequirementsError(f"Python packages still missing after installation: {describe_missing(still)}. Restart Slicer and try again.")
        return True

    # -- Slicer application only -------------------------------------------------------------------------------
    def _ensure_torch(self, torch: Requirement, ask_confirmation: bool) -> bool:
        """Install or upgrade PyTorch through the PyTorch extension (PyTorchUtils.installTorch with a version
        requirement, which picks the build for the GPU driver), as SlicerMONAIAuto3DSeg does."""
        try:
            import PyTorchUtils
        except ImportError:
            raise RequirementsError("PyTorch is needed: install the 'PyTorch' extension from the Extensions Manager and restart Slicer.") from None
        import slicer

        version = installed_version(TORCH)
        if version is not None:
            # Installed but too old (monai needs at least this): offer the upgrade instead of letting pip pull
            # a torch from the package index (a CPU-only build on Windows) while installing monai.
            question = (
                f"{self.requester} needs PyTorch {torch.specifier}, but PyTorch {version} is installed. Upgrade it now "
                "through the PyTorch extension? (Slicer must be restarted afterwards if PyTorch was already used.)"
            )
            if ask_confirmation and not slicer.util.confirmOkCancelDisplay(question, windowTitle=f"{self.requester}: PyTorch"):
                return False
            ask_confirmation = False
        installed = PyTorchUtils.PyTorchUtilsLogic().installTorch(askConfirmation=ask_confirmation, torchVersionRequirement=str(torch.specifier))
        return installed is not None

    def _pip_ensure(self, requirements: list[Requirement], ask_confirmation: bool) -> bool:
        try:
            import slicer.packaging as packaging  # Slicer 5.12 and later
        except ImportError:
            packaging = None
        if packaging is not None and hasattr(packaging, "pip_ensure"):
            try:
                packaging.pip_ensure(requirements, prompt_install=ask_confirmation, requester=self.requester)
            except RuntimeError as exc:  # pip_ensure raises RuntimeError when the user declines
                logging.info("%s: %s", self.requester, exc)
                return False
            return True
        import slicer

        text = ", ".join(str(r) for r in requirements)
        if ask_confirmation and not slicer.util.confirmOkCancelDisplay(
            f"{self.requester} needs these Python packages: {text}. Install them now?", windowTitle=f"{self.requester}: Python packages",
        ):
            return False
        slicer.util.pip_install([str(r) for r in requirements])
        return True
