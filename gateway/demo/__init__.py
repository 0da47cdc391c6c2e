"""The demo: certificates and the mock market services."""
