"""Pictures the page shows, written into Gradio's file cache so that two visitors never race on one file.

Gradio stores a PIL image or array returned to a Gallery at `<cache>/<hash of its bytes>/image.webp`,
writing that file in place (`gradio.processing_utils.save_pil_to_cache`). When two visitors get the same
picture at the same moment (the same example photo introduced by both), the second write truncates the
file while the first visitor's download of it is under way, and that download fails ("Too little data
for declared Content-Length"). Here the bytes go to a temporary file in the same folder and are renamed
over the final name, so a reader always sees one whole file. The name stays content-addressed with
Gradio's seeded hash (the same picture gives the same path, so the cache holds it once; without the
install's secret seed, nobody can compute a picture's URL from a photo they guess a visitor used). A path
inside Gradio's cache is served as it is and swept by `delete_cache` like Gradio's own files.
"""

from __future__ import annotations

import io
import os
import tempfile
from pathlib import Path

import numpy as np
from gradio.processing_utils import hash_bytes
from gradio.utils import get_upload_folder
from PIL import Image

FORMAT = "webp"


def cached(picture: Image.Image | np.ndarray, folder: str | os.PathLike | None = None) -> str:
    """The path of `picture` (PIL image or uint8 `[H, W, 3]` array) as a WebP file under `folder`
    (default: Gradio's upload/cache folder)."""
    if isinstance(picture, np.ndarray):
        picture = Image.fromarray(picture)
    buffer = io.BytesIO()
    picture.save(buffer, format=FORMAT)
    data = buffer.getvalue()
    target = Path(folder or get_upload_folder()) / f"ego-{hash_bytes(data)}" / f"picture.{FORMAT}"
    target.parent.mkdir(parents=True, exist_ok=True)
    # Rewritten even when it exists: the rename is atomic (a download under way keeps reading the old,
    # identical file) and it renews the file's age for Gradio's sweep.
    descriptor, staging = tempfile.mkstemp(dir=target.parent, prefix=".picture-")
    try:
        with os.fdopen(descriptor, "wb") as file:
            file.write(data)
        os.replace(staging, target)
    except BaseException:
        Path(staging).unlink(missing_ok=True)
        raise
    return str(target)
