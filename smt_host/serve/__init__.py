"""Serving: torch.export programs with their plan, and scoring with them."""
