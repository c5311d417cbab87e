"""The VM process: control socket, the machine it hosts and the migration in flight."""
