"""The built wheel, installed into a fresh virtual environment outside the checkout: it carries
its migrations, its type marker and its version, and the quickstart runs against it."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
from sqlalchemy import Engine, text

ROOT = Path(__file__).resolve().parent.parent

pytestmark = pytest.mark.slow


def _uv() -> str:
    uv = os.environ.get("UV") or shutil.which("uv")  # `uv run` sets UV to itself
    if not uv:
        pytest.skip("uv is needed to build and install the wheel (run the tests with uv run)")
    return uv


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A venv outside the checkout with the freshly built wheel installed; its bin folder."""
    uv = _uv()
    out = tmp_path_factory.mktemp("wheel")
    subprocess.run(
        [uv, "build", "--wheel", "--sdist", "-o", str(out / "dist"), str(ROOT)],
        check=True,
        capture_output=True,
        timeout=300,
    )
    (wheel,) = (out / "dist").glob("*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert "tasklib_sqla/py.typed" in names
    assert "tasklib_sqla/migrations/env.py" in names
    assert any(n.startswith("tasklib_sqla/migrations/versions/0002_") for n in names)
    assert list((out / "dist").glob("*.tar.gz")), "no sdist"
    venv = out / "venv"
    subprocess.run(
        [uv, "venv", "-q", "--python", sys.executable, str(venv)],
        check=True,
        capture_output=True,
        timeout=120,
    )
    subprocess.run(
        [uv, "pip", "install", "-q", "--python", str(venv / "bin" / "python"), str(wheel)],
        check=True,
        capture_output=True,
        timeout=300,
    )
    return venv / "bin"


def _run(bin_dir: Path, cwd: Path, *args: str, **env: str) -> subprocess.CompletedProcess[str]:
    environ = {k: v for k, v in os.environ.items() if not k.startswith(("VIRTUAL_ENV", "PYTHON"))}
    environ.update(env)
    return subprocess.run(
        [str(bin_dir / args[0]), *args[1:]],
        cwd=cwd,
        env=environ,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_the_installed_wheel_migrates_and_reports(
    installed: Path, db_url: str, sync_engine: Engine, tmp_path: Path
) -> None:
    with sync_engine.begin() as conn:  # start from an empty database
        conn.execute(text("DROP TABLE tasks, tasks_workers, tasks_queues, tasks_limits"))
        conn.execute(text("DROP FUNCTION tasklib_notify_insert()"))
    url = db_url.replace("+asyncpg", "")
    done = _run(installed, tmp_path, "tasklib-sqla", "migrate", "--database-url", url)
    assert done.returncode == 0, done.stderr
    with sync_engine.connect() as conn:
        assert conn.scalar(text("SELECT version_num FROM tasklib_alembic_version")) == "0010"
        assert conn.scalar(text("SELECT to_regclass('tasks_workers')")) is not None
    current = _run(
        installed, tmp_path, "tasklib-sqla", "migrate", "--current", TASKLIB_DATABASE_URL=url
    )
    assert "0010 (head)" in current.stdout, current.stderr
    sql = _run(installed, tmp_path, "tasklib-sqla", "migrate", "--sql", "--database-url", url)
    assert "CREATE TABLE tasks" in sql.stdout
    # The package knows its own version, and nothing is imported from the checkout.
    probe = _run(
        installed,
        tmp_path,
        "python",
        "-c",
        "import importlib.metadata as m, tasklib_sqla as t;"
        "print(t.__file__); assert t.__version__ == m.version('tasklib-sqla')",
    )
    assert probe.returncode == 0, probe.stderr
    assert str(ROOT) not in probe.stdout


def test_the_quickstart_runs_against_the_installed_wheel(
    installed: Path, pg_info: dict[str, object], tmp_path: Path
) -> None:
    script = tmp_path / "quickstart.py"
    shutil.copy(ROOT / "examples" / "quickstart.py", script)
    url = f"postgresql://{pg_info['user']}@{pg_info['host']}:{pg_info['port']}/{pg_info['db']}"
    done = _run(installed, tmp_path, "python", str(script), TASKLIB_DATABASE_URL=url)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "users.make_avatar    completed" in done.stdout
