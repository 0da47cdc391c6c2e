"""REST routes from OpenAPI 3: loading (3.0 and 3.1, YAML and JSON), one bad fixture per rule with
its file:line message, exact path templates, tags and x-aup-policy matching, the shipped CRR spec
against the mock that serves it, and routes and reloads on a running gateway over real TLS."""

from __future__ import annotations

import dataclasses
import json
import shutil
import ssl
import textwrap
import uuid
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml
from aiohttp import web
from openapi_schema_validator import OAS31Validator

from gateway.config.check import check
from gateway.config.openapi import ApiSpec, load_spec
from gateway.config.policy import PolicySet, load_policies
from gateway.config.settings import load_settings
from gateway.config.yamlread import Problems
from gateway.demo.certs import DemoCerts
from gateway.demo.demo import curl_session
from gateway.demo.mock import create_rest_app
from gateway.errors import ConfigError, ErrorCode
from gateway.ops.server import start
from gateway.proxy.routing import NoRoute, Router, Target
from tests.support.ops import admin, wait_for
from tests.support.stack import StackFactory, Upstream

ROOT = Path(__file__).parent.parent
FIXTURES = Path(__file__).parent / "fixtures" / "openapi"
SHIPPED = ROOT / "specs" / "crr_auction_1.0.0.yaml"
GATEWAY = """\
tls: {{cert: s.pem, key: k.pem, client_ca: ca.pem}}
applications:
  OMS: {{upstream: "http://127.0.0.1:9080", protocol: soap}}
  CRR:
    upstream: "http://127.0.0.1:9081"
    protocol: rest
    prefix: /crr
    openapi: {spec}
"""
POLICIES = """\
policies:
  - {name: oms-retrieve, application: OMS, services: ["Retrieve*"], limit: 1, per: 5s}
  - {name: crr-read, application: CRR, tags: [read], limit: 1, per: 5s}
  - {name: crr-any, application: CRR, services: ["*"], limit: 100, per: 5s}
  - {name: crr-strict, application: CRR, methods: [DELETE], limit: 1, per: 1m}
"""


def _setup(tmp_path: Path, spec: Path, policies: str = POLICIES) -> Path:
    (tmp_path / "policies").mkdir(exist_ok=True)
    shutil.copy(spec, tmp_path / spec.name)
    (tmp_path / "policies" / "main.yaml").write_text(policies)
    (tmp_path / "gateway.yaml").write_text(GATEWAY.format(spec=spec.name))
    return tmp_path / "gateway.yaml"


def _load(config: Path) -> PolicySet:
    return load_policies(load_settings(config))


# -- loading -------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["crr_3.0.yaml", "crr_3.1.json"])
def test_a_30_yaml_and_a_31_json_spec_load_to_the_same_routes(name: str, tmp_path: Path) -> None:
    policies = _load(_setup(tmp_path, FIXTURES / name))
    spec = policies.specs["CRR"]
    assert spec.openapi == ("3.0.3" if name.endswith("yaml") else "3.1.0")
    assert [(op.method, op.path, op.service, op.tags) for op in spec.operations] == [
        ("GET", "/auction/v1.0/portfolio", "getPortfolio", ("read",)),
        ("POST", "/auction/v1.0/portfolio", "portfolioSubmission", ("write",)),
        ("GET", "/auction/v1.0/portfolio/{portfolioId}", "getPortfolioById", ("read",)),
        ("GET", "/auction/v1.0/portfolio/latest", "getLatestPortfolio", ("read", "cheap")),
    ]
    assert spec.by_service["getPortfolioById"].policy == "crr-strict"
    assert tmp_path / name in policies.files  # reported, watched and versioned with the policies


def test_the_spec_is_part_of_the_set_version(tmp_path: Path) -> None:
    config = _setup(tmp_path, FIXTURES / "crr_3.0.yaml")
    before = _load(config).version
    spec = tmp_path / "crr_3.0.yaml"
    spec.write_text(spec.read_text().replace("getLatestPortfolio", "getNewestPortfolio"))
    assert _load(config).version != before


def _expected(path: Path) -> str:
    sidecar = path.with_suffix(".expect")
    first = sidecar.read_text() if sidecar.exists() else path.read_text().splitlines()[0]
    return first.removeprefix("# expect: ").strip("\n")


BAD_SPECS = sorted(p for p in (FIXTURES / "bad_specs").iterdir() if p.suffix != ".expect")


@pytest.mark.parametrize("path", BAD_SPECS, ids=lambda p: p.name)
def test_bad_spec_fixture_names_file_line_and_key(
    path: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = _setup(tmp_path, path)
    expected = f"{tmp_path / path.name}:{_expected(path)}"
    with pytest.raises(ConfigError) as caught:
        _load(config)
    assert any(p.startswith(expected) for p in caught.value.problems), (
        expected,
        caught.value.problems,
    )
    assert check(config) == 1  # and `aup-gateway check` prints it
    assert expected in capsys.readouterr().err


@pytest.mark.parametrize(
    "path", sorted((FIXTURES / "bad_spec_policies").glob("*.yaml")), ids=lambda p: p.stem
)
def test_bad_policy_against_a_spec_names_file_line_and_key(path: Path, tmp_path: Path) -> None:
    config = _setup(tmp_path, FIXTURES / "crr_3.0.yaml", path.read_text())
    expected = f"{tmp_path / 'policies' / 'main.yaml'}:{_expected(path)}"
    with pytest.raises(ConfigError) as caught:
        _load(config)
    assert any(p.startswith(expected) for p in caught.value.problems), (
        expected,
        caught.value.problems,
    )


def test_a_json_spec_that_yaml_cannot_compose_still_loads(tmp_path: Path) -> None:
    """Tabs are JSON whitespace but not YAML indentation: lines fall back, loading does not."""
    data = json.loads((FIXTURES / "crr_3.1.json").read_text())
    spec = tmp_path / "tabs.json"
    spec.write_text(json.dumps(data, indent="\t"))
    problems = Problems()
    loaded = load_spec(spec, "CRR", problems)
    assert problems.items == [] and loaded is not None and len(loaded.operations) == 4


# -- matching --------------------------------------------------------------------------------------


def test_tags_and_x_aup_policy_choose_the_policy(tmp_path: Path) -> None:
    policies = _load(_setup(tmp_path, FIXTURES / "crr_3.0.yaml"))

    def name(service: str, method: str) -> str | None:
        found = policies.match("CRR", service, method)
        return found.name if found is not None else None

    assert name("getPortfolio", "GET") == "crr-read"  # tag read, first in order
    assert name("getLatestPortfolio", "GET") == "crr-read"  # any one of the tags matches
    assert name("portfolioSubmission", "POST") == "crr-any"  # tag write: not crr-read
    # x-aup-policy wins over order, though crr-read and crr-any come first and its own
    # methods (DELETE) would not match
    assert name("getPortfolioById", "GET") == "crr-strict"


def test_methods_and_operation_id_globs_still_match(tmp_path: Path) -> None:
    policies = _load(
        _setup(
            tmp_path,
            FIXTURES / "crr_3.0.yaml",
            "policies:\n"
            "  - {name: submits, application: CRR, methods: [POST], limit: 1, per: 5s}\n"
            "  - {name: latest, application: CRR, services: ['get*Latest*'], limit: 1, per: 5s}\n"
            "  - {name: crr-strict, application: CRR, limit: 1, per: 1m}\n",
        )
    )
    assert (policies.match("CRR", "portfolioSubmission", "POST") or _none).name == "submits"
    assert (policies.match("CRR", "getLatestPortfolio", "GET") or _none).name == "latest"
    assert (policies.match("CRR", "getPortfolio", "GET") or _none).name == "crr-strict"


class _None:
    name = None


_none: Any = _None()


def _router(tmp_path: Path) -> tuple[Router, ApiSpec, PolicySet]:
    config = _setup(tmp_path, FIXTURES / "crr_3.0.yaml")
    settings = load_settings(config)
    policies = load_policies(settings)
    return Router(settings), policies.specs["CRR"], policies


@pytest.mark.parametrize(
    ("method", "path", "service"),
    [
        ("GET", "/crr/auction/v1.0/portfolio", "getPortfolio"),
        ("POST", "/crr/auction/v1.0/portfolio", "portfolioSubmission"),
        ("GET", "/crr/auction/v1.0/portfolio/123", "getPortfolioById"),
        ("GET", "/crr/auction/v1.0/portfolio/PF-2024-000117", "getPortfolioById"),
        ("GET", "/crr/auction/v1.0/portfolio/latest", "getLatestPortfolio"),  # concrete first
        ("GET", "/crr/auction/v1.0/portfolio/123/x", None),
        ("GET", "/crr/auction/v1.0/portfolio/", None),
        ("GET", "/crr/auction/v1.0/portfolio/latest/", None),
        ("GET", "/crr/auction/v1.0/portfoliox", None),
        ("GET", "/crr/portfolio", None),  # the servers' base path is part of the URL
        ("GET", "/auction/v1.0/portfolio", "no-application"),  # so is the prefix
        ("DELETE", "/crr/auction/v1.0/portfolio/123", None),
        ("PUT", "/crr/auction/v1.0/portfolio", None),
    ],
)
def test_path_templates_match_exactly(
    method: str, path: str, service: str | None, tmp_path: Path
) -> None:
    router, _, policies = _router(tmp_path)
    target = router.route(method, path, "a=1", None, "application/json", policies.specs)
    if service is None:
        assert isinstance(target, NoRoute) and target.code == ErrorCode.UNKNOWN_SERVICE
        assert target.application is not None and target.application.name == "CRR"
    elif service == "no-application":
        assert isinstance(target, NoRoute) and target.code == ErrorCode.UNKNOWN_APPLICATION
    else:
        assert isinstance(target, Target) and target.service == service
        # the prefix is the gateway's: the upstream receives base path + path, query as sent
        assert target.upstream_path == path.removeprefix("/crr") + "?a=1"


def test_without_the_sets_specs_a_spec_application_routes_nothing(tmp_path: Path) -> None:
    router, _, _ = _router(tmp_path)
    target = router.route("GET", "/crr/auction/v1.0/portfolio", "", None, "")
    assert isinstance(target, NoRoute) and target.code == ErrorCode.UNKNOWN_SERVICE


# -- the shipped spec, the mock and the demo -----------------------------------------------------


def _shipped() -> tuple[ApiSpec, dict[str, Any]]:
    problems = Problems()
    spec = load_spec(SHIPPED, "CRR", problems)
    assert problems.items == [] and spec is not None
    return spec, yaml.safe_load(SHIPPED.read_text())


def _resolve(node: Any, document: dict[str, Any]) -> Any:
    """Local $refs inlined, so one schema can be checked on its own."""
    if isinstance(node, dict):
        if "$ref" in node:
            target: Any = document
            for part in node["$ref"].removeprefix("#/").split("/"):
                target = target[part]
            return _resolve(target, document)
        return {key: _resolve(value, document) for key, value in node.items()}
    if isinstance(node, list):
        return [_resolve(item, document) for item in node]
    return node


def test_the_mock_serves_exactly_the_shipped_spec() -> None:
    spec, _ = _shipped()
    served = {
        (route.method, route.resource.canonical)
        for route in create_rest_app().router.routes()
        if route.resource is not None and not route.resource.canonical.startswith("/_mock/")
    }
    described = {(op.method, op.path) for op in spec.operations}
    assert served == described


async def test_every_operation_of_the_shipped_spec_answers_as_described() -> None:
    spec, document = _shipped()
    runner = web.AppRunner(create_rest_app(), access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    base = f"http://127.0.0.1:{runner.addresses[0][1]}"
    answers = {
        "getPortfolio": ({}, None, 200),
        "portfolioSubmission": ({}, {"portfolioName": "NP15-HEDGE-Q4", "crrs": []}, 200),
        "getPortfolioById": ({"portfolioId": "PF-2024-000117"}, None, 200),
    }
    assert set(answers) == set(spec.by_service)  # a new operation needs a call here
    missing = {"getPortfolioById": ({"portfolioId": "PF-0000-404"}, None, 404)}
    try:
        async with aiohttp.ClientSession() as session:
            for service, (params, body, status) in [*answers.items(), *missing.items()]:
                op = spec.by_service[service]
                path = op.path.format(**params)
                request_id = str(uuid.uuid4())
                async with session.request(
                    op.method, base + path, json=body, headers={"caiso-request-id": request_id}
                ) as response:
                    assert response.status == status, (service, await response.text())
                    assert response.headers["caiso-request-id"] == request_id
                    payload = await response.json()
                described = document["paths"][op.template][op.method.lower()]["responses"]
                answer = _resolve(described[str(status)], document)
                schema = answer["content"]["application/json"]["schema"]
                OAS31Validator(schema).validate(payload)  # raises on any mismatch
    finally:
        await runner.cleanup()


def test_the_demo_configuration_checks_clean_with_the_spec(
    capsys: pytest.CaptureFixture[str],
) -> None:
    assert check(ROOT / "gateway.yaml") == 0
    out = capsys.readouterr().out
    assert "OpenAPI 3.1.0" in out and "specs/crr_auction_1.0.0.yaml: 3 operations" in out
    assert "GET /crr/auction/v1.0/portfolio/{portfolioId}: getPortfolioById [read]" in out
    assert "crr-portfolio-read: CRR * tags read 1 per 5s" in out
    policies = load_policies(load_settings(ROOT / "gateway.yaml"))
    read = policies.match("CRR", "getPortfolioById", "GET")
    assert read is not None and read.name == "crr-portfolio-read"
    assert policies.match("CRR", "portfolioSubmission", "POST") is None  # retrieves only
    session = curl_session(load_settings(ROOT / "gateway.yaml"), ROOT / "certs")
    assert "/crr/auction/v1.0/portfolio/PF-2024-000117" in session
    assert "getPortfolioById" in session


# -- on a running gateway ------------------------------------------------------------------------


async def test_the_demo_configuration_routes_crr_by_its_spec(
    certs: DemoCerts, upstream: Upstream
) -> None:
    """What step 5 of the demo's curl session does, on the shipped gateway.yaml, policies and
    spec (ports and certificates replaced by the test's own)."""
    settings = load_settings(ROOT / "gateway.yaml")
    ports = {"rest": upstream.rest_port, "soap": upstream.soap_port}
    apps = {
        name: dataclasses.replace(app, upstream=f"http://127.0.0.1:{ports[app.protocol]}")
        for name, app in settings.applications.items()
    }
    settings = dataclasses.replace(
        settings,
        listen=dataclasses.replace(settings.listen, port=0),
        admin=None,
        access_log=False,
        tls=dataclasses.replace(
            settings.tls, cert=certs.server, key=certs.server_key, client_ca=certs.ca, crl=certs.crl
        ),
        applications=apps,
    )
    running = await start(settings)
    context = ssl.create_default_context(cafile=str(certs.ca))
    context.load_cert_chain(*map(str, certs.clients["jdoex1234"]))
    url = f"https://localhost:{running.port}/crr/auction/v1.0/portfolio/PF-2024-000117"
    try:
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=context)) as client:
            async with client.get(url) as first:
                assert first.status == 200
                assert (await first.json())["portfolioId"] == "PF-2024-000117"
            async with client.get(url) as second:
                assert second.status == 429  # crr-portfolio-read: tags [read]
                error = (await second.json())["errorList"][0]
                assert "getPortfolioById" in error["errorDescription"]
    finally:
        await running.stop()


SPEC_V1 = """\
openapi: 3.1.0
info: {title: CRR Auction API, version: 1.0.0}
servers: [{url: /auction/v1.0}]
paths:
  /portfolio:
    get:
      operationId: getPortfolio
      tags: [read]
      responses: {"200": {description: ok}}
    post:
      operationId: portfolioSubmission
      tags: [write]
      responses: {"200": {description: ok}}
"""
SPEC_V2 = (
    SPEC_V1
    + """\
  /portfolio/{portfolioId}:
    get:
      operationId: getPortfolioById
      tags: [read]
      parameters: [{name: portfolioId, in: path, required: true, schema: {type: string}}]
      responses: {"200": {description: ok}}
"""
)
CRR_READ = """\
policies:
  - name: crr-read
    application: CRR
    tags: [read]
    limit: 1
    per: 5s
    message: "System is busy due to too many requests for {service}: retry in {retry_after} s"
"""


async def _spec_stack(stack_factory: StackFactory, spec_text: str, tmp_path: Path) -> Any:
    folder = tmp_path / "openapi-stack"
    folder.mkdir()
    (folder / "crr.yaml").write_text(spec_text)
    return await stack_factory(
        {"crr.yaml": CRR_READ},
        folder=folder,
        crr="    faults: errorlist\n    openapi: crr.yaml\n",
    )


async def test_a_running_gateway_routes_and_limits_by_operation(
    stack_factory: StackFactory, tmp_path: Path
) -> None:
    stack = await _spec_stack(stack_factory, SPEC_V2, tmp_path)
    client = stack.client()
    url = f"{stack.url}/crr/auction/v1.0/portfolio"
    async with client.get(f"{url}/PF-2024-000117") as first:
        assert first.status == 200
        assert (await first.json())["portfolioName"] == "NP15-HEDGE-Q3"  # the mock answered
    async with client.get(f"{url}/PF-2024-000118") as again:  # same operation, same key
        assert again.status == 429
        body = await again.json()
        assert "getPortfolioById" in body["errorList"][0]["errorDescription"]
    async with client.get(url) as other:  # another read operation: its own key
        assert other.status == 200
    for _ in range(2):  # tagged write: no policy
        async with client.post(url, json={"portfolioName": "X"}) as submitted:
            assert submitted.status == 200
    for path in (f"{url}/123/x", f"{url}/", f"{stack.url}/crr/portfolio"):
        async with client.get(path) as unknown:
            assert unknown.status == 404, path
            assert ErrorCode.UNKNOWN_SERVICE in await unknown.text()
    # explain knows each operation's method from the spec, and which policy its tags select
    jdoe = "CN=jdoex1234,OU=people,O=CAISO,C=US"
    for service, method, policy in [
        ("portfolioSubmission", "POST", None),
        ("getPortfolioById", "GET", "crr-read"),
    ]:
        status, body, _ = await admin(
            stack, "GET", f"/explain?identity={jdoe}&application=CRR&service={service}"
        )
        assert status == 200 and body["method"] == method, body
        assert (body["policy"] or {}).get("name") == policy, body


async def test_a_changed_spec_reloads_and_a_broken_one_keeps_the_running_set(
    stack_factory: StackFactory, tmp_path: Path
) -> None:
    stack = await _spec_stack(stack_factory, SPEC_V1, tmp_path)
    reloader = stack.running.reloader
    reloader.interval = 0.02
    reloader.poke()
    client = stack.client()
    by_id = f"{stack.url}/crr/auction/v1.0/portfolio/PF-2024-000117"
    async with client.get(by_id) as before:
        assert before.status == 404 and ErrorCode.UNKNOWN_SERVICE in await before.text()

    spec = stack.folder / "crr.yaml"
    spec.write_text(SPEC_V2)
    await wait_for(lambda: reloader.last.seq == 1, what="the watcher to reload the spec")
    assert reloader.last.ok and reloader.last.changed and str(spec) in reloader.last.files
    async with client.get(by_id) as after:
        assert after.status == 200
    async with client.get(by_id) as limited:  # tag read: the policy applies to the new route
        assert limited.status == 429

    running = stack.running.gateway.policies
    spec.write_text(SPEC_V2.replace("      operationId: getPortfolioById\n", ""))
    await wait_for(lambda: reloader.last.seq == 2, what="the failed reload")
    assert reloader.last.ok is False and stack.running.gateway.policies is running
    assert any(
        p.startswith(f"{spec}:15: paths./portfolio/{{portfolioId}}.get: operationId is required")
        for p in reloader.last.problems
    ), reloader.last.problems
    async with client.get(f"{stack.url}/crr/auction/v1.0/portfolio/PF-2024-000118") as kept:
        # the running routes and policies stayed: still getPortfolioById, still limited
        assert kept.status == 429
        assert "getPortfolioById" in (await kept.json())["errorList"][0]["errorDescription"]


def test_spec_fixture_texts_are_what_the_tests_say() -> None:
    """Guards the line number above: SPEC_V2's second path's `get:` is line 15."""
    assert textwrap.dedent(SPEC_V2).splitlines()[14].strip() == "get:"
