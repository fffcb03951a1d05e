"""Sensitivity analysis: per-layer probes, leave-one-out and option probes, skip/rank/bit policies, reports and plots."""
