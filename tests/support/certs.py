"""Demo certificates, generated once per test session with gateway.certs."""

from __future__ import annotations

from pathlib import Path

import pytest

from gateway.demo.certs import DemoCerts, write_demo_certs


@pytest.fixture(scope="session")
def certs(tmp_path_factory: pytest.TempPathFactory) -> DemoCerts:
    out: Path = tmp_path_factory.mktemp("certs")
    return write_demo_certs(out)
