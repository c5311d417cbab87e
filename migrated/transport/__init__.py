"""Transport: sockets and threads around the sans-IO protocol (see the submodules)."""
