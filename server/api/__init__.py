"""The HTTP side: thin routes (``routes/``), their dependencies (``deps``), the OpenAI wire
protocol (``protocol``), the response formats (``formats``), and the transcription service
that turns a form into a request and a result into a response (``service``); plus what guards
the HTTP server itself (``connections``, ``origins``) and owns a request's holdings (``work``).
"""
