"""Blueprints, one per transaction family (PS3.18 names)."""
