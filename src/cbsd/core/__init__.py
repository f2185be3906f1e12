"""The core: VM model, state, locking and the orchestration of every command."""
