"""`aup-gateway check`: the same loaders the gateway runs, offline, every problem printed."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import TextIO

from gateway.config.policy import load_policies
from gateway.config.settings import load_settings
from gateway.errors import ConfigError


def check(config: Path, out: TextIO | None = None, err: TextIO | None = None) -> int:
    """Validate configuration and policies; 0 when both load, 1 with every error printed."""
    out, err = out or sys.stdout, err or sys.stderr
    try:
        settings = load_settings(config)
        policies = load_policies(settings)
    except ConfigError as exc:
        for problem in exc.problems:
            print(problem, file=err)
        print(f"{len(exc.problems)} error(s)", file=err)
        return 1
    print(
        f"ok: {config}: {len(settings.applications)} applications, "
        f"{len(policies.policies)} policies from {len(policies.files) - len(policies.specs)} "
        f"files, {len(policies.specs)} OpenAPI spec(s) "
        f"(version {policies.version})",
        file=out,
    )
    print(f"  server name: {settings.server_name}", file=out)
    for app in settings.applications.values():
        status = f", violations on {app.fault_status}" if app.fault_status is not None else ""
        print(
            f"  application {app.name}: {app.protocol} -> {app.upstream}; faults {app.faults}, "
            f"fault statuses {app.fault_statuses}{status}",
            file=out,
        )
        spec = policies.specs.get(app.name)
        if spec is not None:
            tags = ", ".join(sorted(spec.tags)) or "none"
            print(
                f"    OpenAPI {spec.openapi} {spec.path}: {len(spec.operations)} operations "
                f"(tags: {tags})",
                file=out,
            )
            for op in spec.operations:
                named = f" -> x-aup-policy {op.policy}" if op.policy else ""
                print(
                    f"      {op.method} {app.prefix}{op.path}: {op.service} "
                    f"[{', '.join(op.tags)}]{named}",
                    file=out,
                )
    for policy in policies.policies:
        rate = policy.rate
        reset = ", resets on early retry" if rate.reset_on_early_retry else ""
        tags = f" tags {','.join(policy.tags)}" if policy.tags else ""
        print(
            f"  {policy.name}: {policy.application} {','.join(policy.services)}{tags} "
            f"{rate.limit} per {rate.per:g}s{reset} [{policy.mode}]  ({policy.source})",
            file=out,
        )
    return 0
