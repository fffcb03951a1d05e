"""Calibration data: where it comes from (text, files, bundled datasets, model samples) and the activation
statistics collected from it."""
