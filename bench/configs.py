"""Configuration text for every server in a bench run: the upstream nginx, the nginx peer, and
the gateway (gateway.yaml plus one policy file), and the SOAP bodies both ways.

Pure functions of paths and ports, so tests can check them (`nginx -t`) without running a bench.
The nginx peer is set up to do the gateway's job, as the issue asks: mutual TLS with the same
certificates and the same TLS settings (TLS 1.2+, no session tickets, the CRL), a `limit_req` keyed
on the client's subject DN and the URI, keep-alive to the same upstream, the client identity
passed upstream, one worker.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from gateway.demo.certs import DemoCerts

SERVICE_PATH = "/sst/oms/RetrieveCurrentOutages_OMSv1_AP"
CONTENT_TYPE = "text/xml; charset=utf-8"
# The flood row's other identity calls a service whose policy never trips.
FLOOD_OTHER_PATH = "/sst/oms/SubmitOutage_OMSv1_AP"
# The realistic configuration's REST application (CRR, a route table), and its call.
REST_PATH = "/crr/auction/v1.0/portfolio"
REST_CONTENT_TYPE = "application/json"
REST_BODY = '{"portfolio":{"id":"P-1","bids":[{"node":"NODE_1","mw":10}]}}\n'
REQUEST_BODY = (
    '<?xml version="1.0" encoding="UTF-8"?>\n'
    '<soapenv:Envelope xmlns:soapenv="http://schemas.xmlsoap.org/soap/envelope/" '
    'xmlns:oms="http://www.caiso.com/soa/RetrieveCurrentOutages_OMSv1_AP">'
    "<soapenv:Header/><soapenv:Body><oms:RetrieveCurrentOutages>"
    "<oms:outageRequest><oms:facilityType>GENERATOR</oms:facilityType></oms:outageRequest>"
    "</oms:RetrieveCurrentOutages></soapenv:Body></soapenv:Envelope>\n"
)
RESPONSE_BODY = (
    '<?xml version="1.0" encoding="UTF-8"?>'
    '<soapenv:Envelope xmlns:soapenv="http://schemas.xmlsoap.org/soap/envelope/">'
    '<soapenv:Body><RetrieveCurrentOutagesResponse xmlns="http://www.caiso.com/soa/'
    'RetrieveCurrentOutages_OMSv1_AP"><outages count="1"><outage id="OMS-1"/></outages>'
    "</RetrieveCurrentOutagesResponse></soapenv:Body></soapenv:Envelope>"
)
# nginx's own answer when limit_req refuses a call: a small SOAP 1.1 fault.
NGINX_FAULT_BODY = (
    '<soapenv:Envelope xmlns:soapenv="http://schemas.xmlsoap.org/soap/envelope/">'
    "<soapenv:Body><soapenv:Fault><faultcode>soapenv:Client</faultcode>"
    "<faultstring>Acceptable Use Policy violation: retry later.</faultstring>"
    "</soapenv:Fault></soapenv:Body></soapenv:Envelope>"
)
# "allowed" never trips, and keeps the limiter's sliding log as short as a real policy's: in a
# 1 ms window there are at most a dozen calls at these rates (real AUPs: 1 call per 5 s, per 30
# s). "allowed, long log" also never trips, but its log holds every call of the last second
# (thousands), which shows what a policy with a large limit costs each decision.
# "rejected" is OMS's rule.
ALLOWED_LIMIT, ALLOWED_PER = 1000, "1ms"
LONG_LOG_LIMIT, LONG_LOG_PER = 1_000_000, "1s"
# "limit 1,000 per 1 s": the small-limit row; at this machine's rates it trips, so most
# of its calls are rejected (the limit-independence target compares the long log with "allowed").
SMALL_LIMIT, SMALL_PER = 1000, "1s"
REJECTED_LIMIT, REJECTED_PER = 1, "5s"
NGINX_ALLOWED_RATE = "1000000r/s"
NGINX_REJECTED_RATE = "12r/m"  # 1 per 5 s


@dataclass(frozen=True)
class PeerPorts:
    allowed: int
    rejected: int


def _quoted(text: str) -> str:
    # An nginx string in single quotes: no variables ($), quotes or backslashes inside.
    assert not set("'$\\") & set(text), "bench bodies must not need nginx escaping"
    return f"'{text}'"


def _nginx_main(prefix: Path, workers: int) -> str:
    # nginx started as root switches its workers to `nobody`, which cannot read the bench's
    # private temporary folder; the bench is loopback-only, so workers stay the invoking user.
    user = "user root;\n" if os.geteuid() == 0 else ""
    temp = "\n".join(
        f"    {kind}_temp_path {prefix / (kind + '_temp')};"
        for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")
    )
    return f"""\
{user}worker_processes {workers};
daemon off;
master_process on;
pid {prefix / "nginx.pid"};
error_log {prefix / "error.log"} warn;
events {{
    worker_connections 4096;
}}
http {{
    access_log off;
{temp}
    # Every connection stays open for the whole run, as with the gateway (nginx's default
    # closes a keep-alive connection after 1000 requests, which would add TLS handshakes).
    keepalive_requests 1000000;
    keepalive_timeout 75s;
    server_tokens off;
"""


def _nginx_tls(certs: DemoCerts) -> str:
    return f"""\
        ssl_certificate {certs.server};
        ssl_certificate_key {certs.server_key};
        ssl_client_certificate {certs.ca};
        ssl_crl {certs.crl};
        ssl_verify_client on;
        ssl_protocols TLSv1.2 TLSv1.3;
        ssl_session_tickets off;
"""


def upstream_nginx_conf(prefix: Path, certs: DemoCerts, http_port: int, mtls_port: int) -> str:
    """The fast upstream for everyone (plain HTTP), and the same answer over mutual TLS for the
    "direct" row (a second server block of the same one-worker nginx)."""
    answer = f"""\
        location / {{
            default_type "{CONTENT_TYPE}";
            return 200 {_quoted(RESPONSE_BODY)};
        }}
"""
    return (
        _nginx_main(prefix, 1)
        + f"""\
    server {{
        listen 127.0.0.1:{http_port} backlog=4096;
{answer}    }}
    server {{
        listen 127.0.0.1:{mtls_port} ssl backlog=4096;
{_nginx_tls(certs)}{answer}    }}
}}
"""
    )


def peer_nginx_conf(
    prefix: Path, certs: DemoCerts, upstream_port: int, ports: PeerPorts, workers: int = 1
) -> str:
    """nginx doing the gateway's job: mutual TLS, limit_req per (client DN, URI), keep-alive
    proxying. Two listeners: one whose zone never trips, one at 1 call per 5 s."""

    def server(port: int, zone: str, burst: str) -> str:
        return f"""\
    server {{
        listen 127.0.0.1:{port} ssl backlog=4096;
{_nginx_tls(certs)}
        location / {{
            limit_req zone={zone}{burst};
            proxy_pass http://aup_upstream;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_set_header X-Forwarded-Client-Cert \
"Hash=$ssl_client_fingerprint;Subject=\\"$ssl_client_s_dn\\"";
            proxy_set_header X-Forwarded-For $remote_addr;
            proxy_set_header X-Forwarded-Proto https;
            proxy_set_header X-Request-Id $request_id;
        }}
        location @aup_fault {{
            default_type "{CONTENT_TYPE}";
            return 429 {_quoted(NGINX_FAULT_BODY)};
        }}
    }}
"""

    # limit_req measures in milliseconds with burst 0, so two calls in the same millisecond would
    # trip even a 1000000r/s zone: the allowed zone gets a burst as large as its rate.
    return (
        _nginx_main(prefix, workers)
        + f"""\
    upstream aup_upstream {{
        server 127.0.0.1:{upstream_port};
        keepalive 64;
        keepalive_requests 1000000;
    }}
    limit_req_zone $ssl_client_s_dn$uri zone=aup_allowed:10m rate={NGINX_ALLOWED_RATE};
    limit_req_zone $ssl_client_s_dn$uri zone=aup_rejected:10m rate={NGINX_REJECTED_RATE};
    limit_req_status 429;
    error_page 429 @aup_fault;
{server(ports.allowed, "aup_allowed", " burst=1000000 nodelay")}\
{server(ports.rejected, "aup_rejected", "")}}}
"""
    )


def gateway_yaml(
    certs: DemoCerts, port: int, upstream_port: int, store_url: str, realistic: bool = False
) -> str:
    """gateway.yaml for one gateway scenario; policies in the `policies/` folder next to it.

    `realistic` is what a deployment runs: the JSON access log on (the bench's own rows keep it
    off, to measure the data plane alone), the violation ledger (always on) and a REST
    application beside the SOAP ones."""
    rest = (
        f"""\
  CRR:
    upstream: "http://127.0.0.1:{upstream_port}"
    protocol: rest
    prefix: /crr
    routes: {{"POST /auction/v1.0/portfolio": portfolioSubmission}}
"""
        if realistic
        else ""
    )
    return f"""\
# Written by bench/run.py for one scenario.
listen: {{host: 127.0.0.1, port: {port}}}
tls:
  cert: {certs.server}
  key: {certs.server_key}
  client_ca: {certs.ca}
  crl: {certs.crl}
identity: subject
store: {store_url}
admin: null
policies: policies/
access_log: {"true" if realistic else "false"}
drain_timeout: 1s
applications:
  OMS: {{upstream: "http://127.0.0.1:{upstream_port}", protocol: soap}}
{rest}"""


POLICIES = {
    "allowed": (ALLOWED_LIMIT, ALLOWED_PER),
    "long-log": (LONG_LOG_LIMIT, LONG_LOG_PER),
    "rejected": (REJECTED_LIMIT, REJECTED_PER),
    "limit-1k": (SMALL_LIMIT, SMALL_PER),
    # flood: the flooding identity's service is OMS's rule; the other identity's never trips.
    "flood": (REJECTED_LIMIT, REJECTED_PER),
}


def policy_yaml(kind: str, realistic: bool = False) -> str:
    """The OMS retrieve policy of the kind (`allowed` and `long-log` never trip, `rejected` is
    OMS's 1 per 5 s), the same for the realistic configuration's REST application, and a
    never-tripping one for OMS submits (the flood row's other identity)."""
    limit, per = POLICIES[kind]
    rest = f"""\
  - name: bench-{kind}-rest
    application: CRR
    services: ["*"]
    limit: {limit}
    per: {per}
    mode: enforce
"""
    return f"""\
policies:
  - name: bench-{kind}
    application: OMS
    services: ["Retrieve*"]
    limit: {limit}
    per: {per}
    mode: enforce
{rest if realistic else ""}\
  - name: bench-submits
    application: OMS
    services: ["Submit*"]
    limit: {ALLOWED_LIMIT}
    per: {ALLOWED_PER}
    mode: enforce
"""


def write_gateway_config(
    folder: Path,
    certs: DemoCerts,
    port: int,
    upstream_port: int,
    store_url: str,
    kind: str,
    realistic: bool = False,
) -> Path:
    """gateway.yaml and policies/bench.yaml in `folder`; returns the gateway.yaml path."""
    (folder / "policies").mkdir(parents=True, exist_ok=True)
    (folder / "policies" / "bench.yaml").write_text(policy_yaml(kind, realistic))
    config = folder / "gateway.yaml"
    config.write_text(gateway_yaml(certs, port, upstream_port, store_url, realistic))
    return config
