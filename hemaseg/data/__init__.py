"""Data: decoding scans, finding and checking image/mask pairs, splits, preprocessing and augmentation,
and the synthetic ultrasound generator."""
