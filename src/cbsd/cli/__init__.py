"""The CLI: argument parsing and output only; all decisions are the core's."""
