"""Pruning: unstructured masks (magnitude, random, SNIP, movement; local or global), N:M
semi-structured sparsity, structured channel removal, schedules (one-shot, AGP, lottery-ticket
rewinding) with fine-tuning and distillation through the trainer, and `kiln prune` run dirs."""
