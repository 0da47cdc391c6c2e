"""AUP Gateway: a mutual-TLS reverse proxy that enforces Acceptable Use Policies."""

__version__ = "0.1.0"
