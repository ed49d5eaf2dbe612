"""The multipart form of a transcription request, read as it streams in: text fields in
memory, file parts where the parser left them (in memory, or spooled to a temporary file)."""

from __future__ import annotations

from contextlib import ExitStack
from typing import Any

from starlette.datastructures import UploadFile
from starlette.requests import ClientDisconnect, Request

from server.audio.upload import Upload
from server.config import Settings
from server.errors import RequestCancelledError

# Starlette refuses a form with more text fields or files than these (a 400).
_MAX_FIELDS = 64
_MAX_FILES = 4


async def read_form(request: Request, settings: Settings, owner: ExitStack) -> dict[str, list[Any]]:
    """Read the multipart form into ``name -> [values]``, files as
    :class:`~server.audio.upload.Upload`.

    Args:
        request: The request whose body is the form.
        settings: For the longest text part (``WHISPER_MAX_PROMPT_CHARS``).
        owner: Closes every upload (which removes a file the parser spooled to disk) when it
            is closed.

    Returns:
        Every field with all its values, in the order sent.

    Raises:
        RequestCancelledError: the client went away before the upload finished.
    """
    # A text part may hold a known speaker's reference clip as a data URL: 10 s of 48 kHz
    # stereo WAV is 2.6 MB in base64.
    part_limit = max(4 << 20, settings.max_prompt_chars * 4 + 1024)
    try:
        async with request.form(
            max_files=_MAX_FILES, max_fields=_MAX_FIELDS, max_part_size=part_limit
        ) as form:
            fields: dict[str, list[Any]] = {}
            for name, value in form.multi_items():
                if isinstance(value, UploadFile):
                    upload = owner.enter_context(Upload.take_over(value.file))
                    fields.setdefault(name, []).append(upload)
                else:
                    fields.setdefault(name, []).append(value)
            return fields
    except ClientDisconnect as exc:
        raise RequestCancelledError(
            "The client closed the connection before the upload finished."
        ) from exc


def form_memory(form: dict[str, list[Any]]) -> int:
    """Bytes of host RAM a parsed form holds: its text fields, and its uploads that are not
    on disk.

    Args:
        form: What :func:`read_form` returned.

    Returns:
        The bytes, to be counted against host RAM while the form is held.
    """
    total = 0
    for values in form.values():
        for value in values:
            total += value.memory_bytes if isinstance(value, Upload) else len(value)
    return total
