"""Amazon SES (v1 API) client: domain verification and status polling, off the event loop."""
from __future__ import annotations

import asyncio
import logging
import random
import threading
from concurrent.futures import ThreadPoolExecutor
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from typing import Any

import boto3
from botocore.config import Config
from botocore.exceptions import BotoCoreError, ClientError, ParamValidationError

log = logging.getLogger(__name__)

# GetIdentityVerificationAttributes / GetIdentityDkimAttributes accept at most 100 identities
# per request (AWS SES API reference, "Identities" parameter).
BATCH_SIZE = 100

THROTTLING_CODES = frozenset(
    {"Throttling", "ThrottlingException", "TooManyRequestsException", "RequestLimitExceeded"}
)

# SES v1 VerificationStatus / DkimVerificationStatus values.
_STATUS = {
    "NotStarted": "not_started",
    "Pending": "pending",
    "Success": "success",
    "Failed": "failed",
    "TemporaryFailure": "temporary_failure",
}

# Our own backoff is the only retry layer, so botocore must not retry behind our back.
_BOTO_CONFIG = Config(
    retries={"mode": "standard", "total_max_attempts": 1},
    connect_timeout=5,
    read_timeout=15,
)

Sleep = Callable[[float], Awaitable[object]]


class SesError(Exception):
    """An SES call failed (not retryable, or still throttled after every attempt)."""


class SesUnavailable(SesError):
    """SES could not be reached or kept throttling: every other call would fail the same way."""


@dataclass(frozen=True)
class SesIdentity:
    """What SES returns when verification of a domain starts: TXT token and DKIM CNAME tokens."""

    verification_token: str
    dkim_tokens: tuple[str, ...]


@dataclass(frozen=True)
class SesStatus:
    """Verification state of one domain identity as SES reports it."""

    status: str  # not_started / pending / success / failed / temporary_failure
    dkim_status: str | None
    verification_token: str | None
    dkim_tokens: tuple[str, ...]


# boto3 is pure Python and holds the GIL while it builds and parses requests: calls share
# one thread, so a burst of SES work competes with the event loop from one thread, not many.
_EXECUTOR = ThreadPoolExecutor(max_workers=1, thread_name_prefix="ses")


class SesClient:
    """Async facade over a boto3 `ses` client; every call runs in the SES worker thread."""

    def __init__(
        self,
        *,
        region: str = "us-east-1",
        endpoint_url: str | None = None,
        max_attempts: int = 5,
        base_delay: float = 0.5,
        sleep: Sleep = asyncio.sleep,
    ) -> None:
        self._region = region
        self._endpoint_url = endpoint_url or None
        self._max_attempts = max(1, max_attempts)
        self._base_delay = base_delay
        self._sleep = sleep
        self._client: Any = None
        self._client_lock = threading.Lock()

    async def boto_client(self) -> Any:
        """Return the underlying boto3 client, built once (tests attach a Stubber or hooks)."""
        return await asyncio.get_running_loop().run_in_executor(_EXECUTOR, self._get_client)

    async def verify_domain(self, domain: str) -> SesIdentity:
        """Start (or restart) verification of a domain and its Easy DKIM tokens."""
        identity = await self._call("verify_domain_identity", Domain=domain)
        dkim = await self._call("verify_domain_dkim", Domain=domain)
        log.info("ses: verification started for %s", domain)
        return SesIdentity(
            verification_token=identity["VerificationToken"],
            dkim_tokens=tuple(dkim.get("DkimTokens", ())),
        )

    async def statuses(self, domains: list[str]) -> dict[str, SesStatus]:
        """Return the SES status of every domain, querying in batches of at most 100."""
        unique = list(dict.fromkeys(domains))
        batches = list(_chunks(unique, BATCH_SIZE))
        result: dict[str, SesStatus] = {}
        for number, batch in enumerate(batches, start=1):
            log.info("ses: status batch %d/%d (%d identities)", number, len(batches), len(batch))
            result.update(await self._batch_statuses(batch))
        return result

    async def _batch_statuses(self, batch: list[str]) -> dict[str, SesStatus]:
        verification = await self._call("get_identity_verification_attributes", Identities=batch)
        dkim = await self._call("get_identity_dkim_attributes", Identities=batch)
        v_attrs = verification.get("VerificationAttributes", {})
        d_attrs = dkim.get("DkimAttributes", {})
        return {domain: _status(v_attrs.get(domain), d_attrs.get(domain)) for domain in batch}

    async def _call(self, operation: str, **params: Any) -> dict[str, Any]:
        """Run one SES operation in a thread, retrying throttling with exponential backoff."""
        for attempt in range(1, self._max_attempts + 1):
            try:
                return await asyncio.get_running_loop().run_in_executor(
                    _EXECUTOR, self._invoke, operation, params)
            except ClientError as exc:
                code = exc.response.get("Error", {}).get("Code", "Unknown")
                if code not in THROTTLING_CODES:
                    raise _client_error(operation, code, exc) from exc
                if attempt == self._max_attempts:
                    raise SesUnavailable(
                        f"SES {operation} still throttled after {attempt} attempts"
                    ) from exc
                delay = self._backoff(attempt)
                log.warning(
                    "ses: %s throttled (%s), retry %d in %.2fs", operation, code, attempt, delay
                )
                await self._sleep(delay)
            except ParamValidationError as exc:  # this request's fault, not SES's
                raise SesError(f"SES {operation} refused its parameters") from exc
            except BotoCoreError as exc:  # connection, timeout, credentials: all calls fail
                raise SesUnavailable(f"SES {operation} failed: {type(exc).__name__}") from exc
        raise AssertionError("unreachable")  # pragma: no cover

    def _backoff(self, attempt: int) -> float:
        """Exponential delay for the n-th failed attempt, plus up to 25% jitter."""
        delay = self._base_delay * 2 ** (attempt - 1)
        return delay * (1 + 0.25 * random.random())

    def _invoke(self, operation: str, params: dict[str, Any]) -> dict[str, Any]:
        """Call one boto3 operation (runs in a worker thread)."""
        return getattr(self._get_client(), operation)(**params)

    def _get_client(self) -> Any:
        # Runs in a worker thread: building a boto3 client reads config files and credentials.
        with self._client_lock:
            if self._client is None:
                self._client = boto3.session.Session().client(
                    "ses",
                    region_name=self._region,
                    endpoint_url=self._endpoint_url,
                    config=_BOTO_CONFIG,
                )
            return self._client


def _client_error(operation: str, code: str, exc: ClientError) -> SesError:
    """SesUnavailable for an SES-side (5xx) failure, SesError for a refusal of this call."""
    status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0)
    kind = SesUnavailable if status >= 500 else SesError
    return kind(f"SES {operation} failed: {code}")


def _chunks(items: list[str], size: int) -> Iterator[list[str]]:
    for start in range(0, len(items), size):
        yield items[start:start + size]


def _map_status(raw: str | None) -> str | None:
    if raw is None:
        return None
    mapped = _STATUS.get(raw)
    if mapped is None:
        log.warning("ses: unknown verification status %r", raw)
        return raw.lower()
    return mapped


def _status(verification: dict[str, Any] | None, dkim: dict[str, Any] | None) -> SesStatus:
    """Build a SesStatus; an identity SES does not know has not started verification."""
    verification = verification or {}
    dkim = dkim or {}
    return SesStatus(
        status=_map_status(verification.get("VerificationStatus")) or "not_started",
        dkim_status=_map_status(dkim.get("DkimVerificationStatus")),
        verification_token=verification.get("VerificationToken"),
        dkim_tokens=tuple(dkim.get("DkimTokens", ())),
    )
