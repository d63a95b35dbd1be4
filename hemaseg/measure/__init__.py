"""Measurement: what a lesion is (one connectivity for every path) and its geometry."""
