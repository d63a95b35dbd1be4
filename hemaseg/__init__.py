"""hemaseg: find and measure lesions in 2-D ultrasound with a UNet."""

__version__ = "0.1.0"
