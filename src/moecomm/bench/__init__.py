"""Benchmarks (``moecomm bench ...``): each prints a table and can write JSON. Not tests."""
