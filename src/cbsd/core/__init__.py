"""The core, in four packages whose imports go one way: hosts > manage > checkpoint > vm."""
