"""Live transcription sessions over WebSocket (OpenAI's Realtime API, ``intent=transcription``).

A frame's path: the route (``server.api.routes.realtime``) admits the session (``admission``)
-> the session's socket loop hands each client event (``events``) to the handler for its type
(``session``) -> an update changes the configuration (``session_config``), resolved to what the
decodes run with (``decoding``); an append is decoded (``audio``), held (``buffers``) and cut
into items by server VAD's turns or commits (``input``, ``turns``) -> the transcriber decodes
each item through the engine, a job from the request factory (``transcriber``) -> typed server
events go back (``server_events``).
"""
