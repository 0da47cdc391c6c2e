"""One request, top to bottom: route, decide, forward or fault."""
