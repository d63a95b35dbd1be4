"""hemaseg: find and measure lesions in 2-D ultrasound with a UNet.

Python API::

    import hemaseg
    model = hemaseg.load_model("runs/my-run")      # a run folder or a .pt checkpoint
    pred = model.predict(image_array)                # HxW or HxWxC, any dtype
    pred.prob, pred.mask, pred.area_px               # at the image's original size
    hemaseg.train_model("data/", "runs/x", epochs=20)  # any config key as a keyword
"""

__version__ = "0.1.0"

_API = {
    "load_model": ("inference.predictor", "load_model"),
    "Predictor": ("inference.predictor", "Predictor"),
    "Prediction": ("inference.prediction", "Prediction"),
    "Finding": ("inference.review", "Finding"),
    "train_model": ("training.train", "train_model"),
    "fit": ("training.train", "fit"),
    "build_model": ("models", "build_model"),
    "ModelConfig": ("config", "ModelConfig"),
    "RunConfig": ("config", "RunConfig"),
    "resolve_config": ("config", "resolve_config"),
    "check_dataset": ("data.dataset", "check_dataset"),
    "write_synthetic_dataset": ("data.synth", "write_synthetic_dataset"),
    "write_synthetic_series": ("data.series", "write_synthetic_series"),
    "measure_mask": ("measure.morphometry", "measure_mask"),
    "track": ("measure.track", "track"),
    "TrackRules": ("measure.track", "TrackRules"),
}

__all__ = ["__version__", *_API]


def __getattr__(name: str):
    """Import on first use, so `hemaseg --help` does not pay for torch and MONAI."""
    if name in _API:
        import importlib

        module, attr = _API[name]
        return getattr(importlib.import_module(f".{module}", __name__), attr)
    raise AttributeError(f"module 'hemaseg' has no attribute {name!r}")
