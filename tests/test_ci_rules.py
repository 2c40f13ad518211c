"""The CI rule of tests/conftest.py: under SKETCHPASS_REQUIRE_ASSETS=1 a skipped test fails, except for a
CUDA device or an asset .ci/run names in SKETCHPASS_MISSING_ASSETS."""

import os
import shutil
import subprocess
import sys
from pathlib import Path


def _run(tmp_path, env):
    shutil.copy(Path(__file__).with_name("conftest.py"), tmp_path / "conftest.py")
    (tmp_path / "test_skips.py").write_text(
        "import pytest\n"
        "def test_asset():\n    pytest.skip('needs the Debian package r-cran-janeaustenr')\n"
        "def test_gpu():\n    pytest.skip('no CUDA device on this machine')\n")
    full = {k: v for k, v in os.environ.items() if not k.startswith("SKETCHPASS_")} | env
    r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-rs", "-p", "no:cacheprovider", str(tmp_path)],
                       capture_output=True, text=True, env=full, cwd=tmp_path)
    return r.returncode, r.stdout


def test_skips_are_reported_but_allowed_outside_ci(tmp_path):
    code, out = _run(tmp_path, {})
    assert code == 0 and "2 skipped" in out and "r-cran-janeaustenr" in out


def test_in_ci_a_skipped_asset_test_fails(tmp_path):
    code, out = _run(tmp_path, {"SKETCHPASS_REQUIRE_ASSETS": "1"})
    assert code == 1 and "1 failed, 1 skipped" in out and "fix the install step in .ci/run" in out


def test_in_ci_an_asset_the_machine_could_not_install_may_skip(tmp_path):
    env = {"SKETCHPASS_REQUIRE_ASSETS": "1", "SKETCHPASS_MISSING_ASSETS": "fashion-mnist,janeaustenr"}
    code, out = _run(tmp_path, env)
    assert code == 0 and "2 skipped" in out
