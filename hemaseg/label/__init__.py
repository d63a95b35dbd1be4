"""Label scans on a page and learn from the corrections: `hemaseg label SCANS --into DATASET`, or
`create_app(...)` in Python. Needs the serving dependencies (fastapi, uvicorn, python-multipart)."""

from .app import LabelSettings, create_app
from .finetune import FinetuneSettings

__all__ = ["FinetuneSettings", "LabelSettings", "create_app"]
