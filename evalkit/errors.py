"""Every error evalkit reports, drawn in one place. The CLI prints an EvalkitError as one line
(`evalkit: error: ...`, or `evalkit: stopped: ...` for a run that stopped on purpose) and exits
with its `exit_code`; nothing else reaches the user as a traceback.

    EvalkitError                    exit 2: something the user must fix; the message says how
    ├── ConfigError                 options, config and matrix files, run folders
    ├── DataError                   dataset folders, files and rows
    ├── FetchError                  `evalkit datasets fetch`
    ├── JudgeError                  judge names, options and endpoints
    ├── RecordFileError             a JSONL record file that cannot be read
    ├── ReportError                 `evalkit compare`
    ├── ViewError                   `evalkit view`
    ├── TaskSelectionError          --dimensions / --subtasks
    ├── RequestFailure              one request failed for good (the engine records it; it
    │   │                           escapes only where one request is all there is)
    │   └── RetryableFailure        ... and may succeed when sent again (429, 5xx, timeouts)
    ├── FatalRunError               stopped: every later request would fail the same way
    │   ├── FatalAuthError          exit 3: the endpoint refuses the key
    │   └── FatalEndpointError      the URL is no API base, or does not serve the model
    ├── RunFailed                   exit 1: the run went through, but every request failed
    └── CostLimitReached            exit 5, stopped: the next request would pass --max-cost

Exit codes that are not errors: 0 done, 4 a --fail-if gate failed, 130 interrupted.
"""

from __future__ import annotations

EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_AUTH = 3
EXIT_GATE = 4
EXIT_COST = 5


class EvalkitError(Exception):
    exit_code = EXIT_USAGE
    verb = "error"  # "stopped" for a run that stopped on purpose


class ConfigError(EvalkitError):
    """A configuration problem the user must fix; the message says how."""


class DataError(EvalkitError):
    """A dataset problem: missing folder or file, or a malformed row (message names file:line)."""


class FetchError(EvalkitError):
    """A dataset download that failed or did not verify."""


class JudgeError(EvalkitError):
    """A judge that cannot be built or reached as configured."""


class RecordFileError(EvalkitError):
    """A responses/judgments file with a line that is not a record."""


class ReportError(EvalkitError):
    """Runs that cannot be compared as given."""


class ViewError(EvalkitError):
    """Runs that cannot be viewed as given."""


class TaskSelectionError(EvalkitError):
    """Unknown dimensions or subtasks."""


class RequestFailure(EvalkitError):
    """One failed attempt, classified. failover: the replica is at fault (it refused the
    connection or was just taken out of rotation), so the next attempt goes elsewhere at once."""

    def __init__(self, kind: str, message: str, status: int | None = None, retry_after: float | None = None):
        super().__init__(message)
        self.kind = kind
        self.status = status
        self.message = message
        self.retry_after = retry_after
        self.failover = False

    @property
    def retryable(self) -> bool:
        return self.kind in ("rate_limit", "transient")


class RetryableFailure(RequestFailure):
    pass


class FatalRunError(EvalkitError):
    """Every later request would fail the same way: the run stops (records already written stay)."""

    verb = "stopped"


class FatalAuthError(FatalRunError):
    """401/403: the key is missing or wrong."""

    exit_code = EXIT_AUTH


class FatalEndpointError(FatalRunError):
    """404: the endpoint does not serve this model, or the URL is not an API base."""


class RunFailed(EvalkitError):
    """The run went through, but every request failed: nothing to judge or score."""

    exit_code = EXIT_FAILED


class CostLimitReached(EvalkitError):
    """The next request would pass --max-cost: the run stops; every answer received is kept."""

    exit_code = EXIT_COST
    verb = "stopped"
