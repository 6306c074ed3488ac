"""HTTP: ``cdm serve`` (the composed sampler as an API with access rights). FastAPI + uvicorn.

    config.py      ServeConfig (``[serve]``)             app.py         create_app: the app factory
    routes.py      /v1/samples /v1/sources /v1/epoch /v1/attribute /healthz /readyz
    schemas.py     request and response bodies (pydantic; the OpenAPI schema)
    auth.py        bearer tokens -> principals, access views     errors.py      ApiError
    metrics.py     Prometheus metrics (/metrics)         middleware.py  request id, metrics, audit stream
"""
