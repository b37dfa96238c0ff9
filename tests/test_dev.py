"""./dev shares one venv of dependencies between checkouts, and every checkout runs its own code: two clones,
created and deleted in any order, each see their own msae (the venv holds no msae of any checkout)."""
import os
import shutil
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.slow


def _dev(checkout: Path, *args: str, cwd: Path | None = None) -> str:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "MSAE_DEV", "VIRTUAL_ENV")}
    env["PATH"] = ":".join(p for p in env.get("PATH", "").split(":") if "msae-venvs" not in p and ".dev/bin" not in p)
    out = subprocess.run([str(checkout / "dev"), *args], cwd=cwd or checkout, env=env, capture_output=True, text=True,
                         timeout=900)
    assert out.returncode == 0, (checkout, args, out.stderr[-2000:])
    return out.stdout.strip()


def _clone(tmp: Path, name: str) -> Path:
    dst = tmp / name
    subprocess.run(["git", "clone", "--quiet", str(REPO), str(dst)], check=True, timeout=120)
    version = dst / "msae" / "version.py"
    version.write_text(version.read_text().replace('__version__ = "', f'__version__ = "{name}-'))
    return dst


def test_each_checkout_runs_its_own_code(tmp_path):
    if not (REPO / ".git").exists() or shutil.which("git") is None:
        pytest.skip("needs a git checkout")
    a, b = _clone(tmp_path, "a"), _clone(tmp_path, "b")
    assert _dev(a, "env") == _dev(b, "env") == _dev(REPO, "env")  # one shared venv of dependencies
    venv = Path(_dev(a, "env"))
    assert not list(venv.glob("lib/python*/site-packages/*msae*")), "the venv must not hold an msae"
    assert _dev(a, "msae", "--version").startswith("msae a-")
    assert _dev(b, "msae", "--version").startswith("msae b-")
    assert _dev(b, "python", "-c", "import msae; print(msae.__file__)") == str(b / "msae" / "__init__.py")
    shutil.rmtree(a)  # deleting a checkout changes nothing for the others
    assert _dev(b, "msae", "--version").startswith("msae b-")
    mine = _dev(REPO, "msae", "--version")
    assert mine.startswith("msae ") and "a-" not in mine and "b-" not in mine
    # a command runs in the caller's folder, with relative paths resolved there
    (tmp_path / "here.txt").write_text("x")
    assert _dev(b, "python", "-c", "import os; print(os.path.exists('here.txt'))", cwd=tmp_path) == "True"
