"""``cdm serve`` (the composed sampler as an HTTP API) and ``cdm attribute IMAGE`` (offline or against a registry).

``cdm serve`` is stateless: it follows the registry (``sampler.live.LiveComposition``, hot swap without a restart),
reads tokens and grants from Redis per request, and can run as many replicas as needed. The daemon trains; this
samples.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

from cli.args import csv_ints, csv_list, positive_int
from cli.config import Subparsers, app_config, load_app_config, registry_composition
from daemon.config import AppConfig

if TYPE_CHECKING:
    from fastapi import FastAPI

    from cdm.compose import Composed

WORKER_ENV = "CDM_SERVE_WORKER_ARGS"  # how `cdm serve` with workers > 1 passes its arguments to each worker


def register(sub: Subparsers) -> None:
    """Add ``serve`` and ``attribute`` to the ``cdm`` parser."""
    s = sub.add_parser(
        "serve",
        help="serve the registry's composition over HTTP (tokens, access rights, metrics)",
        description="Run the HTTP sampler: POST /v1/samples, GET /v1/sources, GET /v1/epoch, POST /v1/attribute, "
        "/metrics, /healthz, /readyz, /openapi.json (docs/http-api.md). It follows the registry and hot-swaps new "
        "epochs without a restart. Tokens and grants: `cdm token`, `cdm acl`. Settings: [serve] in config.toml.",
    )
    s.add_argument("--host", default=None, help="interface to bind (default [serve] host)")
    s.add_argument("--port", type=int, default=None, help="port (default [serve] port; 0 = ephemeral)")
    s.add_argument("--workers", type=int, default=None, help="worker processes (default [serve] workers)")
    s.add_argument("--redis", default=None, help="registry URL (default: [redis] url / .services/services.json)")
    s.add_argument("--services", type=Path, default=None, help="services.json of deploy/local (Redis address)")
    s.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    s.set_defaults(func=cmd_serve)

    a = sub.add_parser(
        "attribute",
        help="which source does an image look like: P(source | image) (offline or live registry)",
        description="Noise IMAGE along the forward process at several timesteps and report the posterior over the "
        "sources: the learnt (or heads) kind's router posterior averaged over noise draws (per timestep, then "
        "over timesteps), or for the density routing kind each compartment's diffusion ELBO as its "
        "log-likelihood (method 'elbo'). "
        "--store uses a local store (learnt kind, its router); --redis the registry's served composition, of "
        "any kind. Prints JSON.",
    )
    src = a.add_mutually_exclusive_group(required=True)
    src.add_argument("--store", type=Path, help="local artifact store")
    src.add_argument("--redis", help="registry URL, e.g. redis://127.0.0.1:6379/0")
    a.add_argument("image", type=Path, help="an image file (PNG; any size, resized to the model's)")
    a.add_argument("--sources", type=csv_list, default=None, help="posterior over these sources only (default: all)")
    a.add_argument("--label", type=int, default=None, help="class label of the image (default: unconditional)")
    a.add_argument("--timesteps", type=csv_ints, default=None, help="default [serve] attribute_timesteps")
    a.add_argument(
        "--draws", type=positive_int, default=None, help="noise draws per timestep (default [serve] attribute_draws)"
    )
    a.add_argument("--seed", type=int, default=0)
    a.add_argument("--device", choices=["cpu", "cuda"], default=None)
    a.set_defaults(func=cmd_attribute)


# ---------------------------------------------------------------------------------------------- cdm serve


def build_app(cfg: AppConfig, *, redis_url: str | None = None) -> FastAPI:
    """The ``cdm serve`` app with its clients; the registry watcher starts and stops with the server."""
    from prometheus_client import CollectorRegistry

    from api.app import create_app
    from api.auth import Authenticator
    from api.metrics import SwapMetrics
    from api.process_metrics import VolumeCollector
    from api.ui import GridCache, GridSpec
    from registry.acl import AccessRegistry, ServeLedger
    from registry.client import connect
    from registry.keys import Keys
    from registry.reader import RegistryClient
    from sampler.live import LiveComposition
    from sampler.loader import CompositionLoader

    client = connect(cfg.redis, url=redis_url)
    if cfg.library.sample.threads > 0:
        import torch

        torch.set_num_threads(cfg.library.sample.threads)
    keys = Keys(cfg.redis.namespace)
    reader = RegistryClient(client, keys)
    metrics_registry = CollectorRegistry()
    metrics_registry.register(VolumeCollector({"cache": cfg.cache_base_dir / cfg.artifacts.cache_dir}, used=("cache",)))
    swap_metrics = SwapMetrics(metrics_registry)
    sc = cfg.library.sample
    live = LiveComposition(
        reader,
        CompositionLoader.from_config(
            cfg.artifacts,  # [artifacts]; url "" = [daemon] artifact_dir is the store
            default_dir=Path(cfg.daemon.artifact_dir),
            base_dir=cfg.cache_base_dir,
            device=sc.device,
            vectorize=sc.vectorize,
            metrics=swap_metrics,
        ),
        sample=sc,
        metrics=swap_metrics,
        resync_s=cfg.serve.resync_s,
    )
    access = AccessRegistry(client, keys)
    grids = GridCache(GridSpec.of(sc))

    @asynccontextmanager
    async def lifespan(_: Any) -> AsyncIterator[None]:
        # 1. follow the registry (the first composition loads in the watcher thread; /readyz says when)
        live.start()
        try:
            yield
        finally:
            # 2. reverse order: stop drawing status-page grids, stop following, then close the Redis client
            grids.close()
            live.stop()
            client.close()

    return create_app(
        cfg.serve,
        live=live,
        auth=Authenticator(access, anonymous_principal=cfg.serve.anonymous_principal),
        registry_reader=reader,
        metrics_registry=metrics_registry,
        ledger=ServeLedger(client, keys, audit_maxlen=cfg.serve.audit_maxlen),
        sample_defaults=sc,
        lifespan=lifespan,
        grids=grids,
    )


def _serve_config(args: argparse.Namespace) -> AppConfig:
    cfg = app_config(args)
    serve = dataclasses.replace(
        cfg.serve,
        **{k: v for k, v in (("host", args.host), ("port", args.port), ("workers", args.workers)) if v is not None},
    )
    return dataclasses.replace(cfg, serve=serve)


def worker_app() -> FastAPI:
    """uvicorn's app factory in each worker process (``[serve] workers > 1``): the arguments come in WORKER_ENV."""
    raw = json.loads(os.environ[WORKER_ENV])
    args = argparse.Namespace(
        config=Path(raw["config"]) if raw["config"] else None,
        services=Path(raw["services"]) if raw["services"] else None,
        host=None,
        port=None,
        workers=None,
    )
    return build_app(_serve_config(args), redis_url=raw["redis"])


def cmd_serve(args: argparse.Namespace) -> int:
    import uvicorn

    logging.basicConfig(
        level=args.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr
    )
    cfg = _serve_config(args)
    s = cfg.serve
    common: dict[str, Any] = {
        "host": s.host,
        "port": s.port,
        "log_level": args.log_level.lower(),
        "timeout_keep_alive": 5,
        "timeout_graceful_shutdown": 30,
    }
    if s.workers > 1:
        os.environ[WORKER_ENV] = json.dumps(
            {
                "config": str(args.config) if args.config else None,
                "services": str(args.services) if args.services else None,
                "redis": args.redis,
            }
        )
        uvicorn.run("cli.serve:worker_app", factory=True, workers=s.workers, **common)
    else:
        uvicorn.run(build_app(cfg, redis_url=args.redis), **common)
    return 0


# ---------------------------------------------------------------------------------------------- cdm attribute


def _read_image(path: Path) -> Any:
    import numpy as np
    from PIL import Image, UnidentifiedImageError

    from cdm.errors import DataError

    try:
        with Image.open(path) as im:
            grey = im.mode in ("1", "L", "LA", "I", "I;16", "F")
            arr = np.asarray(im.convert("L" if grey else "RGB"), dtype=np.uint8)
    except FileNotFoundError:
        raise DataError(f"image {path} does not exist") from None
    except (UnidentifiedImageError, OSError) as exc:
        raise DataError(f"{path} is not an image PIL can read: {exc}") from None
    return arr[None, ..., None] if arr.ndim == 2 else arr[None]


def cmd_attribute(args: argparse.Namespace) -> int:
    from cdm.image_attribution import attribute_images

    cfg = load_app_config(args)
    sc, serve = cfg.library.sample, cfg.serve
    device = args.device or sc.device
    image = _read_image(args.image)
    den: Composed
    if args.store is not None:
        from cdm.store import LocalStore

        den = LocalStore(args.store).composed(device=device, vectorize=sc.vectorize)
    else:
        den, _ = registry_composition(cfg, args.redis, device)
    res = attribute_images(
        den,
        image,
        sources=args.sources,
        timesteps=args.timesteps if args.timesteps is not None else serve.attribute_timesteps,
        draws=args.draws if args.draws is not None else serve.attribute_draws,
        class_labels=[args.label] if args.label is not None else None,
        seed=args.seed,
    )
    post = [round(float(v), 6) for v in res.posterior[0]]
    print(
        json.dumps(
            {
                "image": str(args.image),
                "sources": res.sources,
                "posterior": post,
                "top_source": res.sources[post.index(max(post))],
                "by_timestep": [
                    {"t": t, "posterior": [round(float(v), 6) for v in res.by_timestep[i, 0]]}
                    for i, t in enumerate(res.timesteps)
                ],
                "draws": res.draws,
                "seed": args.seed,
                "method": res.method,
            }
        )
    )
    return 0
