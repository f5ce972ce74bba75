"""Trainer integrations. ``albef_fast.integrations.lightning`` needs pytorch_lightning (or lightning)."""
