"""YAML in, frozen settings and policies out; every error names file, line and key."""
