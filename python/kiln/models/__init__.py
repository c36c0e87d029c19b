"""The architectures of the notes, built only on kiln.nn (one file per family)."""
