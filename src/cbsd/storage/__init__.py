"""Storage: the workdir layout, the SQLite inventory, atomic files and the checkpoint store."""
