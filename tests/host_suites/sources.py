"""The hosts' released sdists and their missing test extras, cached under ``CACHE``."""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import os
import shutil
import subprocess
import sys
import tarfile
import urllib.request
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO_ROOT = HERE.parent.parent
INDEX = os.environ.get("HOST_SUITES_INDEX", "https://pypi.org/simple")
CACHE = Path(os.environ.get("HOST_SUITES_CACHE", REPO_ROOT / ".tools" / "host-suites"))


def sdist(package: str) -> Path:
    """The released sdist of the installed version of ``package`` (downloaded once)."""
    version = importlib.metadata.version(package)
    target = CACHE / "sdists"
    target.mkdir(parents=True, exist_ok=True)
    request = urllib.request.Request(
        f"{INDEX}/{package}/", headers={"Accept": "application/vnd.pypi.simple.v1+json"}
    )
    normalized = package.replace("-", "_").lower()
    wanted = f"{normalized}-{version}.tar.gz"
    cached = target / wanted
    if cached.exists():
        return cached
    with urllib.request.urlopen(request, timeout=60) as response:
        files = json.load(response)["files"]
    (entry,) = [f for f in files if f["filename"].lower() == wanted]
    with urllib.request.urlopen(entry["url"], timeout=120) as response:
        data = response.read()
    digest = hashlib.sha256(data).hexdigest()
    if digest != entry["hashes"]["sha256"]:
        raise RuntimeError(f"{wanted}: sha256 {digest} is not the index's")
    partial = cached.with_suffix(".part")
    partial.write_bytes(data)
    partial.replace(cached)
    return cached


def unpack(archive: Path, into: Path) -> Path:
    with tarfile.open(archive) as tar:
        tar.extractall(into, filter="data")
    (root,) = [p for p in into.iterdir() if p.is_dir()]
    return root


def _uv() -> str | None:
    """uv as the Makefile found it (``UV``), on PATH, or the project's private copy."""
    for candidate in (os.environ.get("UV"), "uv", str(REPO_ROOT / ".tools" / "bin" / "uv")):
        found = shutil.which(candidate) if candidate else None
        if found:
            return found
    return None


def extras(name: str, pins: tuple[str, ...]) -> Path:
    """A suite's missing test extras, installed once by uv into ``CACHE/<name>-extras``, a
    directory the suite puts after the environment on ``sys.path``. Without uv (or when the
    install fails) the suite runs without them: the tests that need them fail in both runs
    alike, and the reason is printed."""
    target = CACHE / f"{name}-extras"
    stamp = target / ".installed"
    if stamp.exists() and stamp.read_text() == " ".join(pins):
        return target
    shutil.rmtree(target, ignore_errors=True)
    uv = _uv()
    argv = [uv or "uv", "pip", "install", "--quiet", "--python", sys.executable]
    try:
        if uv is None:
            raise FileNotFoundError("uv not found (UV, PATH, .tools/bin/uv)")
        subprocess.run([*argv, "--target", str(target), *pins], check=True)
    except (OSError, subprocess.CalledProcessError) as exc:
        print(f"  {name}'s test extras not installed ({exc}): running without them")
        return target
    stamp.write_text(" ".join(pins))
    return target
