"""Benchmarks: kernel and end-to-end decode speed against dense attention and bytes floors."""
