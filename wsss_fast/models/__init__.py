"""Checkpoint-compatible CAM models whose attention runs through ``attention_stats``."""

from wsss_fast.models.checkpoint import CheckpointMismatch, load_checkpoint, read_state_dict

__all__ = ["CheckpointMismatch", "load_checkpoint", "read_state_dict"]
