"""The OpenAI-compatible HTTP API: a second front door on the gRPC server's engine.

Modules, each with one job:

* ``app``: the FastAPI app, the auth and body-size gate, the uvicorn runner.
* ``context``: the state routes reach (the gRPC service's), the caller's tenant.
* ``schemas``: request bodies (pydantic), as OpenAI documents them, plus our extensions.
* ``errors``: OpenAI's error body and the HTTP status of every error.
* ``generation``: an API request as engine requests (shared caps, stop strings, deltas).
* ``sse``: server-sent events.
* ``inference``: completions, chat completions, models, adapters.
* ``files`` and ``jobs``: uploaded training files and fine-tuning jobs;
  ``finetuning``: their routes.
"""
