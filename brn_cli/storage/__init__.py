"""Files: atomic writes, checkpoints (read, match, write), plain state dicts. Imports nn/."""
