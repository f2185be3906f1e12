"""Other hosts: nodes, bexport/bimport archives and staging, bmove, bmigrate."""
