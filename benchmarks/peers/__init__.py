"""Adapters that time peer RL libraries for `benchmarks/vs_peers.py`."""
