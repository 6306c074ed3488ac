"""The HTTP surface (Starlette + uvicorn): the daemon's health app and the server that runs ASGI apps.

    health.py   create_health_app: /metrics /healthz /readyz /status of the daemon
    server.py   AppServer: an ASGI app on uvicorn in a background thread, with read timeouts and a connection cap
"""
