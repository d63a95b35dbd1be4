"""HTTP service and web page around a trained model: `hemaseg serve RUN`, or `create_app(...)` in Python.

Needs the serving dependencies (fastapi, uvicorn, python-multipart), which the README's install includes.
"""

from .app import Settings, create_app

__all__ = ["Settings", "create_app"]
