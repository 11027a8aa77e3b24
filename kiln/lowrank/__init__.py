"""Low-rank factorisation: truncated SVD of Linear layers, Tucker-2 of Conv2d layers."""
