"""Exceptions raised by the registry. Every message names the bad value and what is allowed."""

from __future__ import annotations


class RegistryError(Exception):
    """Base class for every error the registry raises on purpose."""


class RegistryConfigError(RegistryError, ValueError):
    """A ``[redis]`` setting is invalid (the daemon reports it as ``cdm.errors.ConfigError``)."""


class RecordError(RegistryError):
    """A stored record cannot be decoded (a field is missing or malformed)."""


class CompartmentNotFound(RegistryError):
    """No compartment with this id is registered."""


class InvalidTransition(RegistryError):
    """A compartment status change that the lifecycle training -> active -> retired does not allow."""


class IdentityInUse(RegistryError):
    """Another live daemon holds this daemon id (its heartbeat is fresh and its process is not known dead)."""
