"""Inference: the Predictor (the one path from a scan to a probability map), its backends, ONNX export
and the postprocessing decided out of fold."""
