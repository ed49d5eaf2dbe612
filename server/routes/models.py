"""GET /v1/models and /v1/models/{id}: the served model, its aliases and the store's folders."""

from __future__ import annotations

from fastapi import APIRouter

from server.deps import Authorized, EngineDep
from server.errors import ModelNotReadyError
from server.protocol import ErrorResponse, ModelCard, ModelList

router = APIRouter(prefix="/v1/models", tags=["models"], dependencies=[Authorized])


def _cards(engine: EngineDep) -> list[ModelCard]:
    served = engine.served
    if served is None:
        raise ModelNotReadyError(f"The model is not loaded: {engine.load_error or 'starting'}.")
    created = int(next((m.loaded_at for m in engine.pool.loaded()), 0))
    ids = [served.id, *engine.store.aliases, *engine.store.local_ids()]
    return [ModelCard(id=i, created=created, owned_by="whisper-server") for i in dict.fromkeys(ids)]


@router.get("", response_model=ModelList)
async def list_models(engine: EngineDep) -> ModelList:
    return ModelList(data=_cards(engine))


@router.get("/{model_id:path}", response_model=ModelCard, responses={404: {"model": ErrorResponse}})
async def get_model(model_id: str, engine: EngineDep) -> ModelCard:
    served = _cards(engine)[0]
    assert engine.served is not None
    source = engine.store.resolve(model_id, engine.served)
    return ModelCard(
        id=model_id if source.id == served.id else source.id,
        created=served.created,
        owned_by=served.owned_by,
    )
