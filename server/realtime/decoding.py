"""What a live session's decodes run with: its configuration resolved, and the request factory.

A configuration (:class:`~server.realtime.session_config.SessionConfig`) is checked when the
session opens and at each update: its model must be one the engine serves, and its language,
prompt and keywords must pass the HTTP endpoints' limits. The result, :class:`LiveDecoding`,
builds the :class:`~server.request.Job` of each decode through the request factory
(:meth:`Job.for_live`), as an HTTP request's is built, and refuses a session whose longest item
could not be decoded in the memory there is now.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from server.batching.policy import LiveDecode
from server.config import Settings
from server.engine.core import Engine
from server.engine.store import ModelSource
from server.errors import InsufficientMemoryError, InvalidRequestError
from server.languages import parse_language
from server.realtime.events import EventError
from server.realtime.session_config import SessionConfig
from server.request import Job, hotwords_of


@dataclass(frozen=True)
class LiveDecoding:
    """A session's configuration, resolved: what each of its decodes asks of the engine.

    Attributes:
        config: The session's configuration.
        source: The model ``config`` names (the served model when it names none).
        settings: The server's (beam size, prompt limit, Chinese script, item length).
        session_id: The session's id; a decode's request id is ``<session>/<item>``.
        api_key: The id of the API key the session was opened with.
    """

    config: SessionConfig
    source: ModelSource
    settings: Settings
    session_id: str
    api_key: str | None = None

    @classmethod
    def resolve(
        cls,
        engine: Engine,
        settings: Settings,
        config: SessionConfig,
        *,
        session_id: str,
        api_key: str | None = None,
    ) -> LiveDecoding:
        """``config`` checked: the model it names, and its language, prompt and keywords
        (under the limits of the HTTP endpoints).

        Args:
            engine: Resolves the model's name.
            settings: The server's.
            config: The configuration to check.
            session_id: The session's id.
            api_key: The id of the session's API key.

        Returns:
            The decoding ``config`` asks for.

        Raises:
            ModelNotReadyError, ModelNotFoundError: the model cannot be served.
            InvalidRequestError: an unknown language; :class:`EventError` for a prompt or
                keywords past the limits (its ``param`` the field's name).
        """
        source = engine.resolve(config.model)
        parse_language(config.language)
        limit = settings.max_prompt_chars
        if config.prompt is not None and len(config.prompt) > limit:
            raise EventError(
                f"The prompt is {len(config.prompt)} characters long; the limit is {limit} "
                "(WHISPER_MAX_PROMPT_CHARS).",
                param="prompt",
                code="invalid_value",
            )
        try:
            hotwords_of(config.keywords, None, limit)
        except InvalidRequestError as exc:
            raise EventError(exc.message, param="keywords", code="invalid_value") from exc
        return cls(config, source, settings, session_id, api_key)

    def job(
        self,
        samples: np.ndarray,
        item_id: str,
        seconds: float | None = None,
        decode: LiveDecode = "final",
    ) -> Job:
        """The request that decodes ``samples`` with the session's options.

        Args:
            samples: 16 kHz audio of one item (or of its start, for an interim decode).
            item_id: The item's id, in the request id.
            seconds: For a check, the length of audio to plan for instead of ``samples``'.
            decode: ``"final"`` (the item's transcript, or its early decode) or
                ``"interim"`` (for deltas): finals are served first.

        Returns:
            The job, from the request factory.
        """
        config, settings = self.config, self.settings
        return Job.for_live(
            samples,
            request_id=f"{self.session_id}/{item_id}",
            api_key=self.api_key,
            source=self.source,
            language=config.language,
            prompt=config.prompt,
            keywords=config.keywords,
            logprobs=config.logprobs,
            beam_size=settings.realtime_beam_size,
            max_prompt_chars=settings.max_prompt_chars,
            chinese_script=settings.chinese_script,
            seconds=seconds,
            decode=decode,
            per_region=settings.language_detection == "region",
            languages=settings.languages,
        )

    def check_memory(self, engine: Engine) -> None:
        """Refuse the session when it opens if the planner could not fit even the decode of
        its longest item (``WHISPER_REALTIME_MAX_ITEM_SECONDS``, one window at most) now, rather
        than fail its first item. Each decode is planned again when it runs.

        Args:
            engine: The engine whose planner is asked.

        Raises:
            InsufficientMemoryError: with the planner's reason and when to retry.
        """
        seconds = min(self.settings.realtime_max_item_seconds, 30.0)
        plan = engine.check(self.job(np.zeros(0, np.float32), "check", seconds), seconds)
        if plan is None or plan.action != "reject":
            return
        retry = plan.retry_after or self.settings.retry_after
        raise InsufficientMemoryError(
            f"Not enough memory to transcribe a live session now ({plan.why or 'no memory'}); "
            f"try again in {retry:g} s.",
            retry_after=retry,
        )


__all__ = ["LiveDecoding"]
