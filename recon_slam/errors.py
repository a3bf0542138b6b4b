"""User-facing error types.

Every error a user can cause (bad files, bad calibration, bad topics, bad stamps) is raised
as a :class:`ReconSlamError` subclass whose message names the problem *and* the fix. The
command line prints it as one line and exits non-zero (no traceback unless ``--debug``).
"""


class ReconSlamError(Exception):
    """Base class of errors caused by input or configuration, not by a bug."""


class InputError(ReconSlamError):
    """A file, folder, bag or topic cannot be used (missing, unreadable, wrong content)."""


class CalibrationError(ReconSlamError):
    """Camera calibration is missing or inconsistent."""


class EncodingError(ReconSlamError):
    """An image encoding or message type is not supported."""


class StampError(ReconSlamError):
    """Timestamps are missing, go backwards, or cannot be associated."""
