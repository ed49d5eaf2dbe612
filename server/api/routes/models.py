"""/v1/models: the models this server can serve, where each is loaded now, and loading and
unloading them by hand (``POST`` and ``DELETE /v1/models/{id}``, as speaches names them)."""

from __future__ import annotations

from fastapi import APIRouter
from fastapi.responses import JSONResponse
from starlette.concurrency import run_in_threadpool

from server.api.deps import Authorized, EngineDep
from server.api.protocol import ErrorResponse, LoadedCopy, ModelCard, ModelList
from server.engine.core import Engine
from server.engine.store import ModelSource

router = APIRouter(prefix="/v1/models", tags=["models"], dependencies=[Authorized])


def _card(engine: Engine, name: str, source: ModelSource) -> ModelCard:
    copies = [m for m in engine.pool.loaded() if m.source.load_target == source.load_target]
    created = int(min((m.loaded_at for m in copies), default=engine.started_at))
    return ModelCard(
        id=name,
        created=created,
        owned_by="whisper-server",
        loaded=[LoadedCopy(**engine.model_status(m)) for m in copies],
    )


@router.get("", response_model=ModelList)
async def list_models(engine: EngineDep) -> ModelList:
    served = engine.served_model()
    ids = [served.id, *engine.store.aliases, *engine.store.local_ids()]
    return ModelList(
        data=[_card(engine, i, engine.store.resolve(i, served)) for i in dict.fromkeys(ids)]
    )


@router.get("/{model_id:path}", response_model=ModelCard, responses={404: {"model": ErrorResponse}})
async def get_model(model_id: str, engine: EngineDep) -> ModelCard:
    source = engine.resolve(model_id)
    return _card(engine, model_id, source)


@router.post(
    "/{model_id:path}",
    response_model=ModelCard,
    responses={404: {"model": ErrorResponse}, 503: {"model": ErrorResponse}},
)
async def load_model(model_id: str, engine: EngineDep) -> ModelCard:
    """Load a model now (planned against the memory free, like a request)."""
    source = engine.resolve(model_id)
    await run_in_threadpool(engine.load, source)
    return _card(engine, model_id, source)


@router.delete(
    "/{model_id:path}",
    response_model=ModelCard,
    responses={
        202: {"model": ModelCard},
        404: {"model": ErrorResponse},
        409: {"model": ErrorResponse},
    },
)
async def unload_model(model_id: str, engine: EngineDep) -> JSONResponse:
    """Unload a model: 200 when it is gone, 202 when a request still uses it (it goes when the
    last one ends)."""
    source = engine.resolve(model_id)
    held = await run_in_threadpool(engine.unload_source, source)
    card = _card(engine, model_id, source)
    # `deleted` as in OpenAI's ModelDeleted, which the SDK's models.delete() reads.
    body = {**card.model_dump(), "deleted": not held}
    return JSONResponse(body, status_code=202 if held else 200)


__all__ = ["router"]
