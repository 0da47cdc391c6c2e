"""Command line: argument parsing only; each command forwards to a public function."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

from gateway.errors import ConfigError


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="aup-gateway", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)

    serve = commands.add_parser("serve", help="run the gateway")
    serve.add_argument("--config", type=Path, default=Path("gateway.yaml"))
    serve.add_argument(
        "--workers",
        type=int,
        default=1,
        help="processes sharing the port (SO_REUSEPORT); needs a shared store",
    )

    check = commands.add_parser("check", help="validate configuration and policies offline")
    check.add_argument("--config", type=Path, default=Path("gateway.yaml"))

    certs = commands.add_parser("certs", help="create demo CA, server and participant certificates")
    certs.add_argument("--out", type=Path, default=Path("certs"))

    mock = commands.add_parser("mock-upstream", help="run the demo SOAP and REST market services")
    mock.add_argument("--host", default="127.0.0.1")
    mock.add_argument("--soap-port", type=int, default=9080)
    mock.add_argument("--rest-port", type=int, default=9081)

    demo = commands.add_parser("demo", help="certificates, mock services and the gateway at once")
    demo.add_argument("--config", type=Path, default=Path("gateway.yaml"))

    ledger = commands.add_parser(
        "ledger", help="print or export the violation ledger's episodes (docs/ledger.md)"
    )
    ledger.add_argument("--config", type=Path, default=Path("gateway.yaml"))
    ledger.add_argument("--identity", help="a subject DN, a CN or a certificate fingerprint")
    ledger.add_argument("--application", help="only this application (OMS, DRRS, ...)")
    ledger.add_argument("--service", help="only this service")
    ledger.add_argument("--since", help="episodes that end after: 1h, 30m, 7d ago, or ISO 8601")
    ledger.add_argument("--until", help="episodes that start before: a duration ago or ISO 8601")
    ledger.add_argument("--limit", type=int, help="at most this many (the newest)")
    ledger.add_argument(
        "--format",
        choices=("table", "json", "jsonl", "csv"),
        default="table",
        help="table (default), a JSON array, JSON lines or CSV (for disputes: every field)",
    )
    ledger.add_argument("--json", action="store_true", help="the same as --format json")

    simulate = commands.add_parser(
        "simulate", help="replay recorded calls (the JSON access log) against candidate policies"
    )
    simulate.add_argument("--config", type=Path, default=Path("gateway.yaml"))
    simulate.add_argument("--policies", type=Path, required=True, help="the candidate set's folder")
    simulate.add_argument("--calls", type=Path, required=True, help="the access log to replay")
    simulate.add_argument("--json", action="store_true", help="JSON instead of a table")

    args = parser.parse_args(argv)
    logging.basicConfig(
        level=os.environ.get("LOG_LEVEL", "INFO"),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    try:
        return _dispatch(args)
    except ConfigError as exc:
        for problem in exc.problems:
            print(problem, file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 0


def _dispatch(args: argparse.Namespace) -> int:
    if args.command == "serve":
        from gateway.config.settings import load_settings
        from gateway.ops.server import run_workers

        return run_workers(load_settings(args.config), args.workers)
    if args.command == "check":
        from gateway.config.check import check

        return check(args.config)
    if args.command == "certs":
        from gateway.demo.certs import write_demo_certs

        made = write_demo_certs(args.out)
        print(
            f"certificates in {args.out}: CA {made.ca.name}, server {made.server.name}, "
            f"clients {', '.join(sorted(made.clients))}"
        )
        return 0
    if args.command == "mock-upstream":
        from gateway.demo.mock import serve_mock_upstream

        serve_mock_upstream(args.host, args.soap_port, args.rest_port)
        return 0
    if args.command == "ledger":
        from gateway.ops.ledger import print_ledger

        return print_ledger(
            args.config,
            identity=args.identity,
            since=args.since,
            until=args.until,
            limit=args.limit,
            application=args.application,
            service=args.service,
            output=args.format,
            as_json=args.json,
        )
    if args.command == "simulate":
        from gateway.ops.simulate import run_simulate

        return run_simulate(args.config, args.policies, args.calls, args.json)
    if args.command == "demo":
        from gateway.demo.demo import run_demo

        run_demo(args.config)
        return 0
    raise AssertionError(args.command)
