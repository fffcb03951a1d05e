"""The on-disk format: tensor names and version, header checks before any load, checkpoint inspection,
atomic output folders."""
