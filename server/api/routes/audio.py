"""POST /v1/audio/transcriptions and /v1/audio/translations: thin, the work is in the
transcription service (server.api.service)."""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import Response

from server.api.deps import Authorized, TranscriptionsDep
from server.api.protocol import ErrorResponse, form_schema

router = APIRouter(prefix="/v1/audio", tags=["audio"], dependencies=[Authorized])

_ERRORS: dict[int | str, dict[str, object]] = {
    code: {"model": ErrorResponse} for code in (400, 401, 404, 413, 429, 503)
}


@router.post(
    "/transcriptions",
    openapi_extra=form_schema("transcribe"),
    responses=_ERRORS,
    response_class=Response,
    summary="Transcribe audio into the input language (OpenAI createTranscription).",
)
async def transcriptions(request: Request, service: TranscriptionsDep) -> Response:
    return await service.handle(request, "transcribe")


@router.post(
    "/translations",
    openapi_extra=form_schema("translate"),
    responses=_ERRORS,
    response_class=Response,
    summary="Translate audio into English (OpenAI createTranslation).",
)
async def translations(request: Request, service: TranscriptionsDep) -> Response:
    return await service.handle(request, "translate")
