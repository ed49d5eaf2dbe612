"""POST /v1/audio/transcriptions and /v1/audio/translations: thin, the work is in serving."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, Request
from fastapi.responses import Response

from server.api.deps import (
    AdmissionDep,
    Authorized,
    DecodersDep,
    EngineDep,
    MetricsDep,
    SettingsDep,
)
from server.api.protocol import ErrorResponse, form_schema
from server.api.service import TranscriptionService

router = APIRouter(prefix="/v1/audio", tags=["audio"], dependencies=[Authorized])

_ERRORS: dict[int | str, dict[str, object]] = {
    code: {"model": ErrorResponse} for code in (400, 401, 404, 413, 429, 503)
}


def get_service(
    engine: EngineDep,
    settings: SettingsDep,
    metrics: MetricsDep,
    decoders: DecodersDep,
    admission: AdmissionDep,
) -> TranscriptionService:
    return TranscriptionService(engine, settings, metrics, decoders, admission)


ServiceDep = Annotated[TranscriptionService, Depends(get_service)]


@router.post(
    "/transcriptions",
    openapi_extra=form_schema("transcribe"),
    responses=_ERRORS,
    response_class=Response,
    summary="Transcribe audio into the input language (OpenAI createTranscription).",
)
async def transcriptions(request: Request, service: ServiceDep) -> Response:
    return await service.handle(request, "transcribe")


@router.post(
    "/translations",
    openapi_extra=form_schema("translate"),
    responses=_ERRORS,
    response_class=Response,
    summary="Translate audio into English (OpenAI createTranslation).",
)
async def translations(request: Request, service: ServiceDep) -> Response:
    return await service.handle(request, "translate")
