"""Live transcription sessions over WebSocket (OpenAI's Realtime API, ``intent=transcription``)."""
