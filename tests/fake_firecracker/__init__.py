"""A spec-enforcing fake of Firecracker's API server, for tests on hosts where Firecracker cannot run."""
