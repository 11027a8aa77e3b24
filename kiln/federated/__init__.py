"""Federated learning on Flower: apps, partitions of the real data, compressed updates, privacy."""
