"""The shipped weights and recipes travel with the package: a wheel, installed outside the
repository, finds them without the source tree."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import sysconfig
import venv
import zipfile
from pathlib import Path

from streamguard.checkpoints import WEIGHTS_DIR, read_manifest
from streamguard.recipes import list_recipes, pipelines_dir

REPO = Path(__file__).resolve().parents[1]

# Run by the wheel's interpreter, from a folder outside the repository.
CHECK = r"""
import json, sys
import streamguard
from streamguard.checkpoints import WEIGHTS_DIR, read_manifest
from streamguard.recipes import list_recipes, load_recipe, pipelines_dir
try:
    from streamguard.detector import load_defense
except ImportError:  # moved with the PatchZero module
    from streamguard.patchzero import load_defense

defense = load_defense("synth-patchzero")
recipe = load_recipe("synth-clip")
print(json.dumps({
    "streamguard": streamguard.__file__,
    "weights_dir": str(WEIGHTS_DIR),
    "pipelines_dir": str(pipelines_dir()),
    "recipe": recipe.name,
    "recipe_path": str(recipe.path),
    "recipes": list_recipes(),
    "manifest": sorted(read_manifest()),
    "defense": type(defense).__name__,
    "meta_path": [getattr(f, "__module__", "") or type(f).__module__ for f in sys.meta_path],
    "sys_path": sys.path,
}))
"""


def _run(cmd: list, **kwargs) -> subprocess.CompletedProcess:
    """Run ``cmd``; on failure, the assertion shows the end of its output."""
    done = subprocess.run([str(c) for c in cmd], check=False, capture_output=True, text=True, env=_env(), **kwargs)
    assert done.returncode == 0, f"{' '.join(map(str, cmd[:4]))} ...: exit {done.returncode}\n{(done.stdout + done.stderr)[-3000:]}"
    return done


def _env() -> dict[str, str]:
    """This environment without anything that would point Python or StreamGuard back at the repo."""
    drop = {"PYTHONPATH", "PYTHONHOME", "PYTHONSTARTUP", "STREAMGUARD_WEIGHTS", "VIRTUAL_ENV", "PIP_REQUIRE_VIRTUALENV"}
    env = {k: v for k, v in os.environ.items() if k not in drop}
    env["PYTHONNOUSERSITE"] = "1"
    env["PIP_DISABLE_PIP_VERSION_CHECK"] = "1"
    return env


def _build_wheel(tmp: Path) -> Path:
    """``pip wheel`` of a copy of the package's sources (so the build writes nothing into the repo)."""
    src = tmp / "src"
    src.mkdir()
    for name in ("setup.py", "pyproject.toml", "README.md"):
        shutil.copy2(REPO / name, src / name)
    for name in ("streamguard", "weights", "pipelines"):
        shutil.copytree(REPO / name, src / name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc", ".*.tmp"))
    dist = tmp / "dist"
    _run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "--no-index", "-w", dist, src], cwd=tmp)
    (wheel,) = dist.glob("streamguard-*.whl")
    return wheel


def _venv_seeing_our_dependencies(root: Path) -> Path:
    """A fresh venv whose site-packages comes first and then this interpreter's (torch & co.).

    The dependencies are reached by a plain path line in a ``.pth`` file, so the ``.pth`` files
    *in* this interpreter's site-packages (the editable install's finder of the repository among
    them) are not run there.
    """
    venv.EnvBuilder(with_pip=False, clear=True).create(root)
    python = root / ("Scripts/python.exe" if os.name == "nt" else "bin/python")
    purelib = _run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"]).stdout.strip()
    ours = dict.fromkeys(sysconfig.get_paths()[k] for k in ("purelib", "platlib"))
    (Path(purelib) / "_streamguard_test_deps.pth").write_text("".join(f"{p}\n" for p in ours))
    return python


def test_wheel_installed_outside_the_repo_finds_weights_and_recipes(tmp_path: Path) -> None:
    wheel = _build_wheel(tmp_path)
    names = set(zipfile.ZipFile(wheel).namelist())
    for name in ("weights/manifest.json", "weights/synth-patchzero.pt", "pipelines/synth-clip.toml"):
        assert f"streamguard/{name}" in names

    root = tmp_path / "venv"
    python = _venv_seeing_our_dependencies(root)
    _run([python, "-m", "pip", "install", "-q", "--no-deps", "--no-index", "--ignore-installed", wheel], cwd=tmp_path)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    found = json.loads(_run([python, "-c", CHECK], cwd=elsewhere).stdout.strip().splitlines()[-1])

    root = root.resolve()
    for key in ("streamguard", "weights_dir", "pipelines_dir", "recipe_path"):
        path = Path(found[key]).resolve()
        assert path.is_relative_to(root), f"{key} = {path}: not the wheel's copy in {root}"
        assert not path.is_relative_to(REPO), f"{key} = {path}: the repository's copy"
    assert not any("editable" in m for m in found["meta_path"]), found["meta_path"]
    assert not any(Path(p).resolve() == REPO for p in found["sys_path"] if p)
    assert found["recipe"] == "synth-clip" and found["defense"] == "PatchZero"
    assert {"synth-patchzero", "synth-tiny3d"} <= set(found["manifest"])
    assert found["recipes"] == list_recipes()


def test_source_tree_reads_its_top_level_folders() -> None:
    """In the repository (editable install or none), the data packages are the top-level folders."""
    assert pipelines_dir().resolve() == REPO / "pipelines"
    if "STREAMGUARD_WEIGHTS" not in os.environ:
        assert WEIGHTS_DIR.resolve() == REPO / "weights"
    assert {"synth-patchzero", "synth-tiny3d"} <= set(read_manifest())
