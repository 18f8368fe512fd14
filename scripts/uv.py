"""Run uv, installing it for this checkout first if the machine lacks it.

    python3 scripts/uv.py run --extra test pytest

Works with any Python 3.8+ and nothing else: a pyenv or python.org Python, or a Debian/Ubuntu
system Python that refuses ``pip install`` (PEP 668). uv goes into ``.tools/`` in this
checkout (git ignores it), never into the system:

1. ``uv`` on PATH (or in ``.tools/``): used as it is;
2. else a virtual environment ``.tools/venv`` with ``pip install uv``;
3. else (a Python without ``venv``/``ensurepip``, as on a bare Debian) the uv wheel for this
   platform is fetched from PyPI and its binary unpacked into ``.tools/bin``.
"""

from __future__ import annotations

import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import urllib.parse
import urllib.request
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TOOLS = ROOT / ".tools"
EXE = ".exe" if os.name == "nt" else ""


def found() -> str | None:
    for candidate in (TOOLS / "bin" / f"uv{EXE}", TOOLS / "venv" / "bin" / f"uv{EXE}"):
        if candidate.exists():
            return str(candidate)
    return shutil.which("uv")


def from_venv() -> str | None:
    venv = TOOLS / "venv"
    try:
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, capture_output=True)
        subprocess.run(
            [str(venv / "bin" / "python"), "-m", "pip", "install", "-q", "uv"], check=True
        )
    except (subprocess.CalledProcessError, OSError):
        shutil.rmtree(venv, ignore_errors=True)
        return None
    return found()


def _wheel_matches(filename: str) -> bool:
    machine = platform.machine().lower()
    arch = {"amd64": "x86_64", "arm64": "aarch64"}.get(machine, machine)
    if sys.platform.startswith("linux"):
        libc = "musllinux" if "musl" in (platform.libc_ver()[0] or "") else "manylinux"
        return libc in filename and filename.endswith(f"{arch}.whl")
    if sys.platform == "darwin":
        mac_arch = "arm64" if machine == "arm64" else "x86_64"
        return "macosx" in filename and (mac_arch in filename or "universal2" in filename)
    return False


def from_wheel() -> str | None:
    index = "https://pypi.org/pypi/uv/json"
    with urllib.request.urlopen(index, timeout=60) as response:
        release = json.load(response)
    wheels = [f for f in release["urls"] if f["filename"].endswith(".whl")]
    wheel = next((f for f in wheels if _wheel_matches(f["filename"])), None)
    if wheel is None:
        return None
    target = TOOLS / "bin"
    target.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / wheel["filename"]
        # Mirrors may answer with addresses relative to the index.
        urllib.request.urlretrieve(urllib.parse.urljoin(index, wheel["url"]), path)
        with zipfile.ZipFile(path) as zf:
            member = next(n for n in zf.namelist() if n.endswith(f"/scripts/uv{EXE}"))
            with zf.open(member) as src, open(target / f"uv{EXE}", "wb") as dst:
                shutil.copyfileobj(src, dst)
    (target / f"uv{EXE}").chmod(0o755)
    return found()


def main() -> int:
    uv = found() or from_venv() or from_wheel()
    if uv is None:
        sys.stderr.write("scripts/uv.py: could not install uv; see https://docs.astral.sh/uv/\n")
        return 1
    os.chdir(ROOT)
    # Trust the machine's own certificate store, as pip and curl do: behind a proxy with its
    # own CA (common in companies) uv's built-in roots would refuse PyPI. Older uv versions
    # call it native TLS.
    os.environ.setdefault("UV_SYSTEM_CERTS", "1")
    os.environ.setdefault("UV_NATIVE_TLS", "1")
    # Install packages with their bytecode compiled. Where PYTHONDONTWRITEBYTECODE is set (some
    # CI images and sandboxes set it), nothing else ever writes it, and every process compiles
    # SQLAlchemy, pydantic and the rest from source: a worker then needs 2-3 s instead of 1 s to
    # start, which the fault suite's outage scenarios notice, and every CLI test pays.
    os.environ.setdefault("UV_COMPILE_BYTECODE", "1")
    if os.name == "nt":
        return subprocess.call([uv, *sys.argv[1:]])
    os.execv(uv, [uv, *sys.argv[1:]])


if __name__ == "__main__":
    raise SystemExit(main())
