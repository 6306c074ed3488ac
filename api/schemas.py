"""Request and response bodies of the ``cdm serve`` API (pydantic v2; they are the OpenAPI schema too).

Bounds here are the hard limits of the API (a request outside them is a 422); a principal's own limits
(``[serve] max_n``, ``max_steps``, ...) are checked by the routes and answered with 429.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, StringConstraints

from api.config import MAX_N, MAX_STEPS, MAX_TIMESTEP
from common.names import SOURCE_NAME_PATTERN

SourceName = Annotated[str, StringConstraints(pattern=rf"^{SOURCE_NAME_PATTERN.pattern}$")]  # common.names
Scheduler = Literal["ddpm", "ddim", "dpm"]
Format = Literal["png", "npz", "json"]
MAX_SEED = 2**32 - 1
MAX_LABEL = 1_000_000
MAX_SOURCES_PER_REQUEST = 256
MAX_GUIDANCE = 100.0
GREY_8X8_PNG = "iVBORw0KGgoAAAANSUhEUgAAAAgAAAAICAAAAADhZOFXAAAAEElEQVR4nGNsYIAAJgaKGAAmCACQXTClHgAAAABJRU5ErkJggg=="


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid")


class SampleBody(_Body):
    """``POST /v1/samples``."""

    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={"examples": [{"n": 2, "steps": 2, "seed": 0}, {"n": 1, "labels": [3], "format": "png"}]},
    )

    n: int = Field(4, ge=1, le=MAX_N, description="number of images (your limit: see 429)")
    labels: list[Annotated[int, Field(ge=0, le=MAX_LABEL)]] | None = Field(
        None, min_length=1, max_length=MAX_N, description="class labels, cycled over the images; none = unconditional"
    )
    sources: list[SourceName] | None = Field(
        None,
        min_length=1,
        max_length=MAX_SOURCES_PER_REQUEST,
        description="compose only from these (intersected with the sources you may use); none = all of yours",
    )
    top_k: int | None = Field(None, ge=1, le=MAX_SOURCES_PER_REQUEST, description="route each image to k sources")
    steps: int | None = Field(None, ge=1, le=MAX_STEPS, description="denoising steps (default: the server's)")
    scheduler: Scheduler | None = Field(None, description="diffusers sampler (default: the server's)")
    seed: int | None = Field(None, ge=0, le=MAX_SEED, description="seed of the initial noise (default: random)")
    guidance_scale: float | None = Field(
        None,
        ge=0,
        le=MAX_GUIDANCE,
        allow_inf_nan=False,
        description=(
            "classifier-free guidance s with labels (1 = none; > 1 guided; default: the server's [sample] "
            "guidance_scale); no-op without labels"
        ),
    )
    format: Format = Field("json", description="json (base64 PNGs), png (a grid with attribution bars) or npz")


class SampleResponse(BaseModel):
    """``POST /v1/samples`` with ``format: "json"``."""

    epoch: int = Field(description="registry epoch of the composition that produced the images")
    sources: list[str] = Field(description="the sources composed for this request: the attribution columns")
    n: int
    seed: int
    steps: int
    scheduler: Scheduler
    top_k: int | None
    guidance_scale: float = Field(1.0, description="the classifier-free guidance scale used (1 = none)")
    image_shape: list[int] = Field(description="[height, width, channels] of each image")
    images: list[str] = Field(description="base64-encoded PNG per image")
    attribution: list[list[float]] = Field(
        description="per image, the mean router weight of each source over the trajectory (rows sum to 1)"
    )


class SourceInfo(BaseModel):
    name: str
    tags: dict[str, str]
    n_samples: int
    compartment_id: str
    epoch: int = Field(description="registry epoch of the composition serving it")


class SourcesResponse(BaseModel):
    """``GET /v1/sources``: the sources the caller may use in the served composition."""

    epoch: int
    sources: list[SourceInfo]


class EpochResponse(BaseModel):
    """``GET /v1/epoch``."""

    epoch: int = Field(description="registry epoch of the served composition")
    loaded_at: float = Field(description="unix seconds when this replica loaded it")


class AttributeParams(_Body):
    """Options of ``POST /v1/attribute`` (JSON fields, or form fields next to a PNG upload)."""

    sources: list[SourceName] | None = Field(
        None, min_length=1, max_length=MAX_SOURCES_PER_REQUEST, description="posterior over these (and yours) only"
    )
    label: int | None = Field(None, ge=0, le=MAX_LABEL, description="class label of the image; none = unconditional")
    timesteps: list[Annotated[int, Field(ge=0, le=MAX_TIMESTEP)]] | None = Field(
        None, min_length=1, max_length=32, description="forward-process timesteps (default: the server's)"
    )
    draws: int | None = Field(None, ge=1, le=4096, description="noise draws per timestep (default: the server's)")
    seed: int | None = Field(None, ge=0, le=MAX_SEED, description="seed of the noise draws (default: 0)")


class AttributeBody(AttributeParams):
    """``POST /v1/attribute`` as JSON."""

    model_config = ConfigDict(extra="forbid", json_schema_extra={"examples": [{"image": GREY_8X8_PNG, "draws": 1}]})

    image: str = Field(min_length=1, description="the image as base64-encoded PNG")


class TimestepPosterior(BaseModel):
    t: int
    posterior: list[float]


class AttributeResponse(BaseModel):
    """``POST /v1/attribute``: P(source | image) over the caller's sources: the router's posterior (learnt and heads
    routing kinds) or the compartments' ELBOs (density routing kind)."""

    epoch: int
    sources: list[str] = Field(description="the posterior's columns: the sources considered, nothing else")
    posterior: list[float] = Field(
        description="router: mean over timesteps of the per-timestep posteriors; elbo: from the summed ELBO terms"
    )
    top_source: str
    by_timestep: list[TimestepPosterior] = Field(
        description="router: the posterior at each timestep (mean over draws); elbo: from that timestep's term alone"
    )
    draws: int
    seed: int
    method: Literal["router", "elbo"] = Field(
        description="router: the router's (or heads') posterior; elbo: the compartments' diffusion ELBOs (density)"
    )
    method_description: str = Field(description="how the posterior was computed")


class ErrorResponse(BaseModel):
    """Every error: a short code and a message saying what was wrong and what to do."""

    error: str
    message: str


class HealthResponse(BaseModel):
    status: Literal["ok"]


class ReadyResponse(BaseModel):
    status: Literal["ready", "not ready"]
    reason: str
    epoch: int | None = Field(description="epoch of the served composition, if any")
    registry_epoch: int | None = Field(description="the registry's epoch now, if it could be read")
