"""One error hierarchy for the whole product.

Messages name what is wrong, where, and what was expected. The CLI turns a
``TunepipeError`` into one line and exit code 2; anything else is a bug (exit 1).
"""


class TunepipeError(Exception):
    """Base of every user-facing error (bad input, bad config, unreachable storage).

    ``retryable`` tells the orchestrator whether waiting can help: bad input never gets better
    by retrying, an endpoint that is down may come back.
    """

    retryable = False
    exit_code = 2  # the CLI's exit status for this error


class ConfigError(TunepipeError):
    """The configuration or search space is invalid."""


class DataError(TunepipeError):
    """Input data is missing, unreadable or does not match an expected schema."""


class StorageError(TunepipeError):
    """The storage root or an object store cannot be read or written."""


class TrackingError(TunepipeError):
    """MLflow tracking or registry cannot be used as configured."""


class ExperimentBusy(TunepipeError):
    """Another run holds the experiment's lease (``infra.lease``); the CLI exits 3, not 2: the input is fine,
    the experiment is taken."""

    exit_code = 3


class ServiceUnavailable(TunepipeError):
    """An endpoint (S3, MLflow) cannot be reached right now; retrying may help."""

    retryable = True


class ClusterLost(ServiceUnavailable):
    """A Ray cluster joined through RAY_ADDRESS went away: we did not start it and cannot restart it."""

    retryable = False


# Words in S3 client errors (pyarrow's curl, botocore) that mean the endpoint could not be reached.
_UNREACHABLE = ("network_connection", "could not connect", "couldn't connect", "connection refused",
                "connection reset", "connection aborted", "timed out", "timeout was reached", "broken pipe")


def storage_failure(message: str, cause: BaseException) -> TunepipeError:
    """A StorageError, or a retryable ServiceUnavailable when ``cause`` says the endpoint was unreachable.

    An object store that is down for a while must not fail a stage for good: the orchestrator
    retries only retryable errors.
    """
    text = str(cause).lower()
    return (ServiceUnavailable if any(w in text for w in _UNREACHABLE) else StorageError)(message)
