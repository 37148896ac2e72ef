"""Shared by training and serving: the export contract, the models, and input preprocessing."""
