"""Offline training scripts that export the served models (docs/models.md, "Training")."""
