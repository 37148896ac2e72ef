"""The multipart upload of ``POST /predict/digit``: a picture → one MNIST-style 28×28 image."""

from __future__ import annotations

import asyncio
import logging

import numpy as np
from fastapi import Request
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException

from app.services.errors import InvalidInput, Malformed, ServiceError, TooLarge, UnsupportedMedia
from app.state import app_state
from modelspec.imaging import (
    ImageError,
    ImageTooLargeError,
    UnsupportedImageError,
    preprocess_digit,
)

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
    max_pixels = app_state(request).settings.max_image_pixels
    try:
        image = await asyncio.to_thread(preprocess_digit, data, max_pixels)
    except ImageError as exc:
        raise _image_error(exc) from None
    except Exception:  # never a 500 for a bad picture; the log keeps the cause
        log.exception("image preprocessing failed")
        raise InvalidInput("the picture could not be processed", "invalid_image") from None
    return image[None]


def _image_error(exc: ImageError) -> ServiceError:
    """A picture that cannot be used, as the domain error of its kind (with its code)."""
    if isinstance(exc, UnsupportedImageError):
        return UnsupportedMedia(str(exc), exc.code)
    if isinstance(exc, ImageTooLargeError):
        return TooLarge(str(exc), exc.code)
    return InvalidInput(str(exc), exc.code)
