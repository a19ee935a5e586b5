"""The wheel as a user gets it: the MIT licence, `py.typed` in both packages (so that
`mypy --strict` of a user's code sees the typed client, not `Any`), project URLs and
classifiers. Built with pip (an isolated build: setuptools comes from the package index,
as in CI) and installed into a fresh virtualenv without dependencies.
"""

from __future__ import annotations

import subprocess
import sys
import venv
import zipfile
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    out = tmp_path_factory.mktemp("wheel")
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", str(ROOT), "-w", str(out)],
        check=True,
        capture_output=True,
        timeout=300,
    )
    (built,) = out.glob("nats_cron-*.whl")
    yield built


def test_the_wheel_holds_the_licence_types_and_metadata(wheel: Path) -> None:
    with zipfile.ZipFile(wheel) as archive:
        names = archive.namelist()
        licence = [n for n in names if n.endswith("/LICENSE") and ".dist-info/" in n]
        assert licence, names
        assert "MIT License" in archive.read(licence[0]).decode()
        assert "nats_apscheduler/py.typed" in names
        assert "nats_cron_cli/py.typed" in names
        # The dashboard is served from the installed package: no build step, no CDN.
        for asset in ("index.html", "app.js", "app.css", "icon.svg"):
            assert f"nats_apscheduler/dashboard/{asset}" in names
        metadata = archive.read(next(n for n in names if n.endswith(".dist-info/METADATA")))
    text = metadata.decode()
    assert "License: MIT" in text or "License-Expression: MIT" in text
    assert "Project-URL: " in text
    assert "Classifier: License :: OSI Approved :: MIT License" in text
    assert "Classifier: Typing :: Typed" in text
    assert (ROOT / "LICENSE").read_text().startswith("MIT License")


USER_CODE = """\
from nats_apscheduler import CronClient, parse_job

async def jobs(api: CronClient) -> int:
    return len(await api.list())

reveal_type(CronClient.list)
reveal_type(parse_job)
"""


def test_mypy_strict_of_a_user_sees_the_types(wheel: Path, tmp_path: Path) -> None:
    env = tmp_path / "venv"
    venv.EnvBuilder(with_pip=False).create(env)
    python = env / "bin" / "python"
    subprocess.run(
        [sys.executable, "-m", "pip", "--python", str(python), "install", "-q", "--no-deps",
         str(wheel)],
        check=True,
        capture_output=True,
        timeout=120,
    )  # fmt: skip
    user = tmp_path / "user.py"
    user.write_text(USER_CODE)
    result = subprocess.run(
        [sys.executable, "-m", "mypy", "--strict", "--python-executable", str(python),
         "--no-incremental", "--follow-imports", "silent", str(user)],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        timeout=300,
    )  # fmt: skip
    out = result.stdout
    assert "missing library stubs or py.typed marker" not in out, out
    assert 'Revealed type is "def (self: nats_apscheduler.client.CronClient' in out, out
    assert 'Revealed type is "def (document: Any, *' in out, out
