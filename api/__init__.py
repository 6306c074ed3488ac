"""HTTP (FastAPI / Starlette + uvicorn): ``cdm serve`` (the composed sampler as an API with access rights), the
daemon's health app and the server that runs ASGI apps.

    config.py      ServeConfig (``[serve]``)             app.py         create_app: the app factory
    routes.py      /v1/samples /v1/sources /v1/epoch /v1/attribute /healthz /readyz
    schemas.py     request and response bodies (pydantic; the OpenAPI schema)
    auth.py        bearer tokens -> principals, access views     errors.py      ApiError
    metrics.py     Prometheus metrics (/metrics)         middleware.py  request id, metrics, audit stream
    health.py      create_health_app: /metrics /healthz /readyz /status of the daemon
    server.py      AppServer: an ASGI app on uvicorn in a background thread, with read timeouts and a connection cap
"""
