"""Optional parts of hemaseg and the one error a missing one gives.

`pip install hemaseg` trains, evaluates, predicts, measures and tracks on PNG/JPEG/TIFF scans; the extras
add the rest: `[serve]` (the web page and HTTP API, the labelling page), `[dicom]` (DICOM scans in, DICOM
SR/SEG out), `[formats]` (COCO RLE masks), `[all]` every one of them. Optional libraries are imported where
they are used, through `require`, so a missing one is a one-line error naming the command that installs it.
"""

from __future__ import annotations

import importlib
from types import ModuleType

EXTRA_OF = {"fastapi": "serve", "uvicorn": "serve", "multipart": "serve", "starlette": "serve",
            "pydicom": "dicom", "jpeg_ls": "dicom", "highdicom": "dicom", "pycocotools": "formats"}


class MissingExtra(ModuleNotFoundError):
    """An optional library is not installed; the message says what needs it and how to install it."""


def require(module: str, what: str) -> ModuleType:
    """Import `module`, or raise MissingExtra: "`what` needs LIB: pip install 'hemaseg[EXTRA]'"."""
    try:
        return importlib.import_module(module)
    except ModuleNotFoundError as e:
        top = module.split(".")[0]
        if e.name is not None and e.name.split(".")[0] != top:
            raise  # the library is there but one of its own imports is broken: not ours to reword
        extra = EXTRA_OF.get(top)
        fix = f"pip install 'hemaseg[{extra}]'" if extra else f"pip install {top}"
        raise MissingExtra(f"{what} needs {top}, which is not installed: {fix}", name=top) from None
