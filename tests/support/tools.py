"""The system programs some tests drive (redis-server, redis-cli, nginx, chromium).

`make test` installs them; when one is missing anyway the test fails with how to get it. It
never skips: a test that needs a real server proves nothing by not running.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest


def require(*names: str, package: str) -> str:
    """The first of `names` found on PATH (or in /usr/sbin); fails the test when none is."""
    for name in names:
        found = shutil.which(name) or (
            f"/usr/sbin/{name}" if Path(f"/usr/sbin/{name}").exists() else None
        )
        if found:
            return found
    pytest.fail(
        f"{names[0]} is not installed: apt-get install {package} "
        f"(`make test` installs it when run as root)"
    )
