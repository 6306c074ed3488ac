"""Loading compositions from the registry: verified artifacts, cached by immutable compartment id."""

from __future__ import annotations

from cdm.artifacts import artifact_path
from cdm.compartment import Compartment
from cdm.compose import Composed, Vectorize
from cdm.config import ModelConfig
from cdm.errors import CdmError
from cdm.routing import Router, build_composition, load_router, needs_router, serving
from registry.client import connect
from registry.config import RedisConfig
from registry.keys import Keys
from registry.reader import RegistryClient
from registry.records import RegistrySnapshot
from sampler.live import Composition


class CompositionLoader:
    """Builds compositions from registry snapshots, caching immutable compartments by id."""

    def __init__(self, *, device: str = "cpu", vectorize: Vectorize = "auto") -> None:
        self.device = device
        self.vectorize: Vectorize = vectorize
        self._compartments: dict[str, Compartment] = {}
        self._router: tuple[str, Router] | None = None

    def build(self, snap: RegistrySnapshot) -> Composition | None:
        """The composition of ``snap``; None while there is nothing to serve (no compartment, or the learnt kind
        without a router covering one)."""
        kind = snap.routing.value
        served, pending = serving(kind, snap.compartment_ids, snap.router.compartment_ids if snap.router else None)
        records = [c for c in snap.compartments if c.compartment_id in set(served)]
        if not records:
            return None
        # 1. router (learnt kind): reload only when the registry names another one; sha256 verified against it
        router, router_sources = None, None
        if snap.router is not None and needs_router(kind):
            if self._router is None or self._router[0] != snap.router.router_id:
                loaded_router, _ = load_router(
                    artifact_path(snap.router.artifact_uri), device=self.device, expected_sha256=snap.router.sha256
                )
                self._router = (snap.router.router_id, loaded_router)
            router = self._router[1]
            router_sources = [_source_of(cid) for cid in snap.router.compartment_ids]
        # 2. compartments: load new ones, reuse cached ones (same id = same bytes)
        loaded = {}
        for rec in records:
            comp = self._compartments.get(rec.compartment_id)
            if comp is None:
                comp = Compartment.load(artifact_path(rec.artifact_uri), device=self.device, expected_sha256=rec.sha256)
            loaded[rec.compartment_id] = comp
        self._compartments = loaded  # drop retired ones from memory
        ids = [r.compartment_id for r in records]
        sources = [r.source for r in records]
        den = build_composition(
            kind,
            [loaded[i] for i in ids],
            sources,
            router=router,
            router_names=router_sources,
            n_samples=[r.n_samples for r in records],
            class_counts=[r.class_counts for r in records],
            vectorize=self.vectorize,
        )
        return Composition(snap.epoch, den, tuple(ids), tuple(sources), pending)


def _source_of(compartment_id: str) -> str:
    return compartment_id.rsplit("@", 1)[0]


def load_live_composition(
    redis: RedisConfig, *, url: str | None = None, device: str = "cpu", vectorize: Vectorize = "auto"
) -> tuple[Composed, ModelConfig]:
    """One-shot: the registry's current composition (for ``cdm sample --redis`` and the demo).

    Args:
        redis: the registry's ``[redis]`` settings (namespace, timeouts, credentials).
        url: a registry URL replacing ``redis.url``.
        device: where the compartments and the router are loaded.
        vectorize: how the composition evaluates its compartments (``[sample] vectorize``).
    """
    client = connect(redis, url=url)
    try:
        snap = RegistryClient(client, Keys(redis.namespace)).snapshot()
    finally:
        client.close()
    comp = CompositionLoader(device=device, vectorize=vectorize).build(snap)
    if comp is None:
        raise CdmError(
            f"the registry at {url or redis.url} serves nothing yet (epoch {snap.epoch}, {len(snap.compartments)} "
            f"active compartment(s), routing {snap.routing.value}, router "
            + ("present" if snap.router else "missing")
            + "); push a source first"
        )
    return comp.denoiser, comp.model_config
