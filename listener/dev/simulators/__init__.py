"""Local stand-ins for the providers, for tests, ``listener demo`` and benchmarks."""
