"""Number-format families (being written)."""
