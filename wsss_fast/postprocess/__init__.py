"""Pseudo-labels from CAMs: background rules, dense CRF, random-walk refinement."""
