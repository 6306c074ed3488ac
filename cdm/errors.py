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


class MalformedArchive(DataError):
    """An .npz archive is not one the library reads: not a zip, corrupt, zip features it refuses (compression
    methods other than stored/deflated, encryption and other flags), a bare .npy, pickled or unknown arrays."""


class DataTooLarge(DataError):
    """Input data would exceed a configured size limit; detected from declared sizes, before it is decompressed
    or allocated."""


class TrainingInterrupted(CdmError):
    """Training stopped at a checkpoint because a stop was requested (warm shutdown); rerunning resumes it.
    Nothing it would have registered was registered, and no forgetting receipt was written."""


class SourceForgotten(CdmError):
    """The source was forgotten (its tombstone is newer than the data at hand): nothing of it is trained."""
