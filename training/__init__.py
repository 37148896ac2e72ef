"""Offline training scripts that export the served models (see README, "Training")."""
