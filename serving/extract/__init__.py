"""Batch extraction: image files -> features folder (locally or on Ray)."""
