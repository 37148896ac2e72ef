"""The multipart upload of ``POST /predict/digit``: a picture → one MNIST-style 28×28 image."""

from __future__ import annotations

import logging

import numpy as np
from fastapi import Request
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException

from app.core.errors import InvalidInput, Malformed
from app.state import app_state

log = logging.getLogger(__name__)


async def read_upload(request: Request) -> np.ndarray:
    """The multipart field ``file`` → float32 [1, 28, 28] through the MNIST preprocessing."""
    try:
        form = await request.form(max_files=1, max_fields=8)
    except HTTPException as exc:
        raise Malformed(f"malformed multipart body: {exc.detail}", "invalid_multipart") from None
    try:
        upload = form.get("file")
        if not isinstance(upload, UploadFile):
            raise InvalidInput('send the picture as a file in the multipart field "file"')
        data = await upload.read()
    finally:
        await form.close()
    if not data:
        raise InvalidInput("the uploaded file is empty", "invalid_image")
    uploads = app_state(request).uploads
    assert uploads is not None, "create_app() sets the upload limiter"
    image = await uploads.preprocess(data)  # app.services.uploads: bounded decoding
    return image[None]
