"""The VM at run time, its lock, its definition files and recovery (below every command)."""
