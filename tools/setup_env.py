#!/usr/bin/env python3
"""Create or update the project's virtual environment ``.venv`` (what ``make setup`` runs).

Steps, each named in the log and in any failure message:
  1. create ``.venv`` with this Python (3.11 expected);
  2. install the pinned requirements (``requirements.txt``) with the pinned ``uv`` installer (parallel
     downloads and unpacking: about 30 s against pip's 85 s for the ~6 GB of CUDA-enabled torch wheels on
     2 cores). uv reads the default PyPI index, not pip's configuration: set ``UV_DEFAULT_INDEX`` for a
     mirror;
  3. install detectron2:
     - default: the PyPI republication ``sal-detectron2==0.7.2`` (a 2024 snapshot of upstream
       ``main``). Its wheel is tagged cp310 and carries a ``_C`` extension built for another
       Python and torch, so it is downloaded, hash-checked, and only its pure-Python
       ``detectron2/`` package is copied into the venv (no ``_C``, no top-level ``tools/``);
     - ``D2_SOURCE=<path or git URL>``: built from upstream source with its compiled ops;
  4. install this project (``deqdet``) in editable mode.

The step is skipped when ``.venv`` already holds an installation made from the same
requirements, the same script and the same ``D2_SOURCE`` (a stamp file records their hash).
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
VENV = ROOT / ".venv"
STAMP = VENV / ".deqdet-setup-stamp"
UV_PROJECT = "uv==0.13.9"
D2_WHEEL_PROJECT = "sal-detectron2==0.7.2"
D2_WHEEL_SHA256 = "491af0c7f79bdb2d178e46f6cb16a97c4ac968d45c41ea3f6b6435d59bbee561"
# Written next to the installed detectron2 package; read by `python -m deqdet.env`.
D2_ORIGIN_FILE = "DEQDET_ORIGIN.txt"


def log(msg: str) -> None:
    print(f"[setup] {msg}", flush=True)


def run(step: str, cmd: list[str], **kwargs) -> None:
    log(f"{step}: {' '.join(cmd)}")
    result = subprocess.run(cmd, **kwargs)
    if result.returncode != 0:
        sys.exit(f"[setup] FAILED at step '{step}' (exit code {result.returncode}): {' '.join(cmd)}")


def venv_python() -> Path:
    return VENV / "bin" / "python"


def stamp_value() -> str:
    digest = hashlib.sha256()
    for name in ("requirements.txt", "tools/setup_env.py", "pyproject.toml"):
        digest.update((ROOT / name).read_bytes())
    digest.update(os.environ.get("D2_SOURCE", "").encode())
    digest.update(sys.version.encode())
    return digest.hexdigest()


def site_packages() -> Path:
    out = subprocess.run(
        [str(venv_python()), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        capture_output=True,
        text=True,
        check=True,
    )
    return Path(out.stdout.strip())


def install_detectron2_from_wheel(pip: list[str]) -> None:
    step = f"install detectron2 ({D2_WHEEL_PROJECT}, Python package only)"
    with tempfile.TemporaryDirectory() as tmp:
        run(
            step + ": download",
            pip + ["download", "--no-deps", "--only-binary=:all:", "--python-version", "3.10",
                   "--dest", tmp, D2_WHEEL_PROJECT],
        )
        wheels = list(Path(tmp).glob("*.whl"))
        if len(wheels) != 1:
            sys.exit(f"[setup] FAILED at step '{step}': expected one wheel, found {wheels}")
        sha = hashlib.sha256(wheels[0].read_bytes()).hexdigest()
        if sha != D2_WHEEL_SHA256:
            sys.exit(
                f"[setup] FAILED at step '{step}': sha256 of {wheels[0].name} is {sha}, "
                f"expected {D2_WHEEL_SHA256}"
            )
        log(f"{step}: sha256 verified")
        target = site_packages()
        shutil.rmtree(target / "detectron2", ignore_errors=True)
        with zipfile.ZipFile(wheels[0]) as zf:
            members = [
                m for m in zf.namelist()
                if m.startswith("detectron2/") and not m.rsplit("/", 1)[-1].startswith("_C.")
            ]
            zf.extractall(target, members)
        (target / "detectron2" / D2_ORIGIN_FILE).write_text(
            f"{D2_WHEEL_PROJECT} wheel (sha256 {D2_WHEEL_SHA256}), pure-Python package only\n"
        )
        log(f"{step}: copied {len(members)} files into {target / 'detectron2'}")


def install_detectron2_from_source(pip: list[str], source: str) -> None:
    step = f"install detectron2 from source ({source})"
    target = site_packages()
    shutil.rmtree(target / "detectron2", ignore_errors=True)  # a copy from the wheel, if any
    spec = f"git+{source}" if source.startswith(("http://", "https://", "git@")) else source
    run(step, pip + ["install", "--no-build-isolation", spec])
    import_dir = subprocess.run(
        [str(venv_python()), "-c", "import detectron2, os; print(os.path.dirname(detectron2.__file__))"],
        capture_output=True, text=True, check=True,
    ).stdout.strip()
    Path(import_dir, D2_ORIGIN_FILE).write_text(f"built from source: {source}\n")


def main() -> None:
    if sys.version_info[:2] != (3, 11):
        log(f"warning: tested with Python 3.11, this is {sys.version.split()[0]}")
    wanted = stamp_value()
    if STAMP.exists() and STAMP.read_text().strip() == wanted:
        log(".venv is up to date (requirements, set-up script and D2_SOURCE unchanged)")
        return
    if not venv_python().exists():
        run("create .venv", [sys.executable, "-m", "venv", str(VENV)])
    pip = [str(venv_python()), "-m", "pip", "--disable-pip-version-check"]
    run(f"install the installer ({UV_PROJECT})", pip + ["install", "--quiet", UV_PROJECT])
    # uv compiles no bytecode at install time (Python compiles what a program imports on first use)
    run(
        "install pinned requirements (requirements.txt)",
        [str(VENV / "bin" / "uv"), "pip", "install", "--python", str(venv_python()),
         "-r", str(ROOT / "requirements.txt")],
    )
    source = os.environ.get("D2_SOURCE")
    if source:
        install_detectron2_from_source(pip, source)
    else:
        install_detectron2_from_wheel(pip)
    run("install deqdet (editable)", pip + ["install", "--no-deps", "--no-build-isolation", "-e", str(ROOT)])
    run("check imports", [str(venv_python()), "-m", "deqdet.env"])
    STAMP.write_text(wanted + "\n")
    log("done")


if __name__ == "__main__":
    main()
