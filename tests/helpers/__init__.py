"""Test helpers others may reuse: a scripted protocol-speaking worker and process helpers."""
