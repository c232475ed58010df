"""Latency: nets timed along a pruning order (profiles, targets) and layers timed alone (latency-aware order)."""
