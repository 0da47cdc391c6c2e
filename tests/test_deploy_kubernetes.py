"""deploy/kubernetes: the manifests are valid Kubernetes (kubernetes-validate, strict, against a
pinned version), wired to each other as the gateway needs (ports, probes, mounts, Secrets, the
drain inside the grace period), the gateway.yaml they carry passes `check`, and a gateway run from
it reloads a ConfigMap-style policy update (the kubelet's `..data` symlink swap) without a restart.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

import aiohttp
import kubernetes_validate
import pytest
import yaml

from gateway.config.check import check
from gateway.config.settings import load_settings
from gateway.config.yamlread import parse_duration
from gateway.demo.certs import DemoCerts
from gateway.ops.server import start
from tests.support.ops import admin, client_ssl, samples, value, wait_for
from tests.support.stack import ENVELOPE, SOAP11, Upstream

KUBERNETES = "1.33.0"  # the version the manifests are validated against
DEPLOY = Path(__file__).parents[1] / "deploy" / "kubernetes"
MANIFESTS = ("gateway-config.yaml", "policies.yaml", "deployment.yaml", "service.yaml")
OMS_RETRIEVE = "RetrieveCurrentOutages_OMSv1_AP"


def documents(name: str) -> list[dict[str, Any]]:
    return [doc for doc in yaml.safe_load_all((DEPLOY / name).read_text()) if doc]


def resource(kind: str) -> dict[str, Any]:
    (found,) = [doc for name in MANIFESTS for doc in documents(name) if doc["kind"] == kind]
    return found


def config_map(name: str) -> dict[str, str]:
    for name_ in MANIFESTS:
        for doc in documents(name_):
            if doc["kind"] == "ConfigMap" and doc["metadata"]["name"] == name:
                data: dict[str, str] = doc["data"]
                return data
    raise AssertionError(f"no ConfigMap {name}")


def containers() -> dict[str, dict[str, Any]]:
    pod = resource("Deployment")["spec"]["template"]["spec"]
    return {container["name"]: container for container in pod["containers"]}


def embedded_config() -> dict[str, Any]:
    config: dict[str, Any] = yaml.safe_load(config_map("aup-gateway-config")["gateway.yaml"])
    return config


def project(folder: Path, files: dict[str, str], stamp: str) -> None:
    """What the kubelet's atomic writer does to a ConfigMap volume: the files go into a new
    hidden `..<timestamp>` folder, a `..data_tmp` symlink to it is renamed over `..data` (the
    one atomic step), each visible name is a symlink through `..data`, the old folder goes."""
    folder.mkdir(parents=True, exist_ok=True)
    old = os.readlink(folder / "..data") if (folder / "..data").is_symlink() else None
    version = folder / f"..2026_12_05_13_00_{stamp}.000000001"
    version.mkdir()
    for name, text in files.items():
        (version / name).write_text(text)
    (folder / "..data_tmp").symlink_to(version.name)
    os.rename(folder / "..data_tmp", folder / "..data")
    for name in files:
        if not (folder / name).is_symlink():
            (folder / name).symlink_to(f"..data/{name}")
    for link in folder.iterdir():
        if link.is_symlink() and not link.name.startswith("..") and link.name not in files:
            link.unlink()
    if old is not None:
        shutil.rmtree(folder / old)


def lay_out_pod(root: Path, certs: DemoCerts, redis_port: int | None = None) -> Path:
    """The pod's /etc/aup under `root`: the config and policies ConfigMaps and the TLS Secret
    as the kubelet mounts them; the gateway.yaml as shipped but for /etc/aup -> root."""
    text = config_map("aup-gateway-config")["gateway.yaml"].replace("/etc/aup/", f"{root}/")
    project(root / "config", {"gateway.yaml": text}, "00")
    project(root / "policies", config_map("aup-gateway-policies"), "00")
    project(
        root / "tls",
        {
            "server.pem": certs.server.read_text(),
            "server-key.pem": certs.server_key.read_text(),
            "ca.pem": certs.ca.read_text(),
            "crl.pem": certs.crl.read_text(),
        },
        "00",
    )
    return root / "config" / "gateway.yaml"


def test_manifests_are_valid_kubernetes_in_strict_mode() -> None:
    validated = 0
    for name in (*MANIFESTS, "secrets.example.yaml"):
        for doc in documents(name):
            kubernetes_validate.validate(doc, KUBERNETES, strict=True)
            validated += 1
    assert validated == 7
    # strict: a misspelt field is refused, not ignored
    broken = resource("Deployment")
    broken["spec"]["template"]["spec"]["terminationGracePeriod"] = 45
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, KUBERNETES, strict=True)
    kustomization = yaml.safe_load((DEPLOY / "kustomization.yaml").read_text())
    assert sorted(kustomization["resources"]) == sorted(MANIFESTS)  # never the example Secrets


def test_the_sidecar_is_wired_as_the_gateway_needs() -> None:
    config = embedded_config()
    deployment = resource("Deployment")
    pod = deployment["spec"]["template"]["spec"]
    gateway = containers()["aup-gateway"]
    ports = {port["name"]: port["containerPort"] for port in gateway["ports"]}
    assert ports == {"https": config["listen"]["port"], "admin": config["admin"]["port"]}
    assert config["admin"]["host"] == "0.0.0.0"  # the kubelet probes the pod's IP
    assert gateway["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "admin"}
    assert gateway["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "admin"}

    # The volumes: whole folders (no subPath, so updates arrive), at the paths gateway.yaml names.
    mounts = {mount["name"]: mount for mount in gateway["volumeMounts"]}
    volumes = {volume["name"]: volume for volume in pod["volumes"]}
    assert all("subPath" not in mount for mount in mounts.values())
    assert gateway["args"] == ["serve", "--config", f"{mounts['config']['mountPath']}/gateway.yaml"]
    assert volumes["config"]["configMap"]["name"] == "aup-gateway-config"
    assert volumes["policies"]["configMap"]["name"] == "aup-gateway-policies"
    assert mounts["policies"]["mountPath"] == config["policies"]
    assert volumes["tls"]["secret"]["secretName"] == "aup-gateway-tls"
    for key in ("cert", "key", "client_ca", "crl"):
        assert Path(config["tls"][key]).parent == Path(mounts["tls"]["mountPath"])
    env = {item["name"]: item for item in gateway["env"]}
    assert config["store"]["url"] == "${REDIS_URL}"
    assert env["REDIS_URL"]["valueFrom"]["secretKeyRef"] == {
        "name": "aup-gateway-redis",
        "key": "url",
    }
    assert config["admin"]["token"] == "${ADMIN_TOKEN}"
    assert env["ADMIN_TOKEN"]["valueFrom"]["secretKeyRef"]["name"] == "aup-gateway-admin"

    # The stop: preStop pause, then the drain, inside the grace period; the service outlives both.
    drain = parse_duration(config["drain_timeout"])
    pause = gateway["lifecycle"]["preStop"]["sleep"]["seconds"]
    service_pause = containers()["market-service"]["lifecycle"]["preStop"]["sleep"]["seconds"]
    assert service_pause >= pause + drain
    assert pod["terminationGracePeriodSeconds"] > max(pause + drain, service_pause)

    # The Service sends 8443 to the gateway's port, and selects this Deployment's pods.
    service = resource("Service")
    assert service["spec"]["ports"] == [
        {"name": "https", "port": 8443, "targetPort": "https", "protocol": "TCP"}
    ]
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert service["spec"]["selector"].items() <= labels.items()
    assert deployment["spec"]["selector"]["matchLabels"].items() <= labels.items()
    for upstream in config["applications"].values():  # the service container, on loopback
        assert upstream["upstream"].startswith("http://127.0.0.1:")


def test_the_shipped_config_passes_check(
    certs: DemoCerts,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    config = lay_out_pod(tmp_path, certs)
    monkeypatch.setenv("REDIS_URL", "redis://:secret@redis.aup.svc.cluster.local:6379/0")
    monkeypatch.setenv("ADMIN_TOKEN", "t0ken")
    assert check(config) == 0
    out = capsys.readouterr().out
    assert "2 applications, 2 policies from 2 files" in out
    assert "drrs-per-service: DRRS * 1 per 30s, resets on early retry [enforce]" in out
    settings = load_settings(config)
    assert settings.store.url == "redis://:secret@redis.aup.svc.cluster.local:6379/0"
    assert settings.admin is not None and settings.admin.token == "t0ken"

    monkeypatch.delenv("REDIS_URL")  # the Secret is missing: check says so, with the line
    assert check(config) == 1
    err = capsys.readouterr().err
    assert f"{config.resolve()}:" in err or f"{config}:" in err
    assert "store.url: environment variable REDIS_URL is not set" in err


async def test_a_configmap_update_reloads_policies_without_a_restart(
    certs: DemoCerts,
    upstream: Upstream,
    redis_url: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    config = lay_out_pod(tmp_path, certs)
    # Free ports and the test's mock service instead of the pod's fixed ones.
    text = config.read_text().replace("port: 8443", "port: 0").replace("port: 9901", "port: 0")
    text = text.replace("127.0.0.1:9080", f"127.0.0.1:{upstream.soap_port}")
    project(tmp_path / "config", {"gateway.yaml": text}, "01")
    monkeypatch.setenv("REDIS_URL", redis_url)
    monkeypatch.setenv("ADMIN_TOKEN", "t0ken")
    running = await start(load_settings(config), reload_interval=0.05)
    try:
        url = f"https://localhost:{running.port}/sst/oms/{OMS_RETRIEVE}"
        body = ENVELOPE.format(op="RetrieveCurrentOutages")
        connector = aiohttp.TCPConnector(ssl=client_ssl(certs))
        async with aiohttp.ClientSession(connector=connector) as client:

            async def call() -> int:
                async with client.post(url, data=body, headers={"Content-Type": SOAP11}) as r:
                    await r.read()
                    return r.status

            assert running.gateway.limiter.name.startswith("redis")
            assert await call() == 200
            assert await call() == 500  # oms-retrieve: 1 per 5 s, enforced
            before = running.gateway.policies.version

            # The operator applies the ConfigMap with oms-retrieve in shadow mode, 1 per hour
            # (so the calls below are over the limit however slowly the machine runs).
            files = config_map("aup-gateway-policies")
            files["oms.yaml"] = (
                files["oms.yaml"].replace("mode: enforce", "mode: shadow").replace("5s", "1h")
            )
            project(tmp_path / "policies", files, "02")
            await wait_for(
                lambda: running.gateway.policies.version != before, what="the ConfigMap reload"
            )
            assert running.reloader.last.ok and running.reloader.last.reason == "watch"
            assert await call() == 200  # over the limit or not, let through
            assert await call() == 200

            # A broken update is refused as a whole; the shadow set keeps running.
            shadow = running.gateway.policies.version
            files["drrs.yaml"] = files["drrs.yaml"].replace("per: 30s", "per: soon")
            project(tmp_path / "policies", files, "03")
            await wait_for(lambda: not running.reloader.last.ok, what="the refused reload")
            assert running.gateway.policies.version == shadow
            assert any("drrs.yaml" in problem for problem in running.reloader.last.problems)
            assert await call() == 200

        assert sorted(p.name for p in (tmp_path / "policies").iterdir()) == [
            "..2026_12_05_13_00_03.000000001",
            "..data",
            "drrs.yaml",
            "oms.yaml",
        ]
        status, ready, _ = await admin(running, "GET", "/readyz")
        assert status == 200 and ready == {"status": "ready"}
        metrics = samples((await admin(running, "GET", "/metrics", token="t0ken"))[1])
        assert value(metrics, "aup_policy_reloads_total", result="ok") == 1
        assert value(metrics, "aup_policy_reloads_total", result="failed") == 1
        calls = {"application": "OMS", "service": OMS_RETRIEVE}
        rejected = value(metrics, "aup_requests_total", decision="rejected", **calls)
        allowed = value(metrics, "aup_requests_total", decision="allowed", **calls)
        shadow = value(metrics, "aup_requests_total", decision="shadow", **calls)
        assert rejected == 1 and shadow >= 2 and allowed + shadow == 4
    finally:
        await running.stop()
