"""Adaptive compute: early exit (BranchyNet, Teerapittayanon et al. 2016; DeeBERT, Xin et al. 2020)."""
