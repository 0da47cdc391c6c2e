"""The demo upstream: the operator's SOAP services (OMS, DRRS, SIBR, CMRI) and the CRR REST
service, realistic enough for the demo and echoing what they received for the tests.
"""

from __future__ import annotations

from gateway.demo.mock.echo import BodyDigest, pattern_chunks
from gateway.demo.mock.rest import create_rest_app
from gateway.demo.mock.server import (
    MockUpstream,
    run_mock_upstream,
    serve_mock_upstream,
    start_mock_upstream,
)
from gateway.demo.mock.soap import create_soap_app

__all__ = [
    "BodyDigest",
    "MockUpstream",
    "create_rest_app",
    "create_soap_app",
    "pattern_chunks",
    "run_mock_upstream",
    "serve_mock_upstream",
    "start_mock_upstream",
]
