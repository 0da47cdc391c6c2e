"""Shared fixtures. Each support module owns one kind of real thing the tests start."""

pytest_plugins = [
    "tests.support.certs",
    "tests.support.stack",
    "tests.support.redis",
    "tests.support.redis_cluster",
    "tests.support.replicas",
]
