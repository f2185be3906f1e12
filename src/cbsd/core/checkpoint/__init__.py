"""Checkpoints and hibernation: save, load, fold, the tree, compatibility."""
