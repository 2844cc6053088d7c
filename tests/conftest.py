"""Fixtures shared by several test files."""
from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest


@pytest.fixture()
def read_only_dir(tmp_path: Path):
    """A folder on a read-only mount when this user may mount, else a folder without write permission."""
    folder = tmp_path / "ro"
    folder.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=1m", "tmpfs", str(folder)],
                             capture_output=True).returncode == 0
    if not mounted:
        if os.geteuid() == 0:
            pytest.skip("root without mount rights: no read-only folder to test with")
        folder.chmod(0o555)
    yield folder
    if mounted:
        subprocess.run(["umount", str(folder)], check=True)
    else:
        folder.chmod(0o755)
