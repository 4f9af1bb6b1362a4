"""What both peer servers share: reading an uploaded image in the three formats the services take."""

from __future__ import annotations

import base64
import binascii

from fastapi import HTTPException, Request
from starlette.datastructures import UploadFile


async def image_bytes(request: Request) -> bytes:
    """The uploaded image: a multipart field `image`, a raw `image/*` body, or JSON `{"image": base64}`."""
    ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if ctype == "multipart/form-data":
        upload = (await request.form()).get("image")
        if not isinstance(upload, UploadFile):
            raise HTTPException(400, "send the image in the multipart field 'image'")
        return await upload.read()
    if ctype.startswith("image/"):
        return await request.body()
    try:
        return base64.b64decode((await request.json())["image"], validate=True)
    except (ValueError, KeyError, TypeError, binascii.Error) as exc:
        raise HTTPException(400, "send JSON {'image': base64}, a multipart field 'image' or an image/* body") from exc
