"""Data: reading files (IDX, tables), fetching and embedded defaults, and the two loaders."""
