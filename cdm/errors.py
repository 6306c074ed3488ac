"""Exceptions raised by the cdm library. Every message names the bad value and what is allowed."""


class CdmError(Exception):
    """Base class for every error the library raises on purpose."""


class ConfigError(CdmError):
    """A configuration value or key is invalid."""


class DataError(CdmError):
    """Input data (an .npz source, an IDX file, a dataset) is missing or malformed."""


class IntegrityError(CdmError):
    """A persisted artifact does not match the sha256 recorded for it."""


class StoreError(CdmError):
    """The local artifact store is inconsistent or an entry is missing."""
