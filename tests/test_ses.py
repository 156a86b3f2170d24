"""SesClient against moto (in-process and server mode) and botocore's Stubber for throttling."""
from __future__ import annotations

import urllib.request
from collections.abc import Iterator
from typing import Any

import pytest
from botocore.stub import Stubber
from moto import mock_aws
from moto.core import DEFAULT_ACCOUNT_ID
from moto.server import ThreadedMotoServer
from moto.ses.models import ses_backends

from policyd.ses import BATCH_SIZE, SesClient, SesError, SesIdentity, SesStatus
from tests.ports import free_port

REGION = "us-east-1"
pytestmark = pytest.mark.usefixtures("aws_env")


@pytest.fixture
def moto_mock() -> Iterator[None]:
    with mock_aws():
        yield


class RecordingSleep:
    """Stands in for asyncio.sleep: records the requested delays, returns at once."""

    def __init__(self) -> None:
        self.delays: list[float] = []

    async def __call__(self, delay: float) -> None:
        self.delays.append(delay)


class CallCounter:
    """A botocore event hook recording the Identities sent with each SES status call."""

    def __init__(self) -> None:
        self.batches: dict[str, list[int]] = {}

    def __call__(self, params: dict[str, Any], model: Any, **_: Any) -> None:
        self.batches.setdefault(model.name, []).append(len(params["Identities"]))


# --- moto, in-process -----------------------------------------------------------------------

async def test_verify_domain_returns_token_and_three_dkim_tokens(moto_mock: None) -> None:
    identity = await SesClient(region=REGION).verify_domain("example.com")
    assert isinstance(identity, SesIdentity)
    assert isinstance(identity.verification_token, str) and identity.verification_token
    assert len(identity.dkim_tokens) == 3
    assert all(isinstance(token, str) and token for token in identity.dkim_tokens)
    assert "example.com" in ses_backends[DEFAULT_ACCOUNT_ID][REGION].email_identities


async def test_unknown_identity_is_not_started(moto_mock: None) -> None:
    result = await SesClient(region=REGION).statuses(["never-seen.example"])
    status = result["never-seen.example"]
    assert status.status == "not_started"
    assert status.verification_token is None
    assert status.dkim_tokens == ()
    # moto answers NotStarted for DKIM of an unknown identity (real SES may omit it: None).
    assert status.dkim_status in (None, "not_started")


async def test_verified_domain_is_success(moto_mock: None) -> None:
    # moto has no Pending phase: VerifyDomainIdentity makes the identity report "Success" at
    # once (and DKIM "Success" with tokens). Pending/Failed mapping is covered by the Stubber test.
    ses = SesClient(region=REGION)
    await ses.verify_domain("verified.example")
    status = (await ses.statuses(["verified.example"]))["verified.example"]
    assert status.status == "success"
    assert status.dkim_status == "success"
    assert status.verification_token
    assert len(status.dkim_tokens) == 3


async def test_statuses_batches_by_100(moto_mock: None) -> None:
    ses = SesClient(region=REGION)
    domains = [f"d{i:03d}.example" for i in range(230)]
    for domain in domains[::50]:  # d000, d050, ..., d200: known to SES
        await ses.verify_domain(domain)
    counter = CallCounter()
    client = await ses.boto_client()
    for operation in ("GetIdentityVerificationAttributes", "GetIdentityDkimAttributes"):
        client.meta.events.register(f"provide-client-params.ses.{operation}", counter)

    result = await ses.statuses(domains + domains[:10])  # duplicates are asked once

    assert counter.batches == {
        "GetIdentityVerificationAttributes": [BATCH_SIZE, BATCH_SIZE, 30],
        "GetIdentityDkimAttributes": [BATCH_SIZE, BATCH_SIZE, 30],
    }
    assert list(result) == domains
    verified = {d for d, s in result.items() if s.status == "success"}
    assert verified == set(domains[::50])
    assert all(s.status == "not_started" for d, s in result.items() if d not in verified)


async def test_statuses_of_nothing_makes_no_call(moto_mock: None) -> None:
    ses = SesClient(region=REGION)
    counter = CallCounter()
    client = await ses.boto_client()
    client.meta.events.register("provide-client-params.ses.*", counter)
    assert await ses.statuses([]) == {}
    assert counter.batches == {}


# --- moto, server mode: proves endpoint_url is honoured ---------------------------------------

@pytest.fixture
def moto_server() -> Iterator[str]:
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    url = f"http://{host}:{port}"
    try:
        yield url
    finally:
        reset = urllib.request.Request(f"{url}/moto-api/reset", method="POST")
        urllib.request.urlopen(reset).close()
        server.stop()


async def test_end_to_end_against_moto_server(moto_server: str) -> None:
    ses = SesClient(region=REGION, endpoint_url=moto_server)
    identity = await ses.verify_domain("server.example")
    result = await ses.statuses(["server.example", "other.example"])

    assert len(identity.dkim_tokens) == 3
    assert result["server.example"].status == "success"
    assert result["other.example"].status == "not_started"
    client = await ses.boto_client()
    assert client.meta.endpoint_url == moto_server
    assert "server.example" in ses_backends[DEFAULT_ACCOUNT_ID][REGION].email_identities


async def test_unreachable_endpoint_is_ses_error() -> None:
    port = free_port()  # nobody listens on it
    ses = SesClient(region=REGION, endpoint_url=f"http://127.0.0.1:{port}")
    with pytest.raises(SesError, match="EndpointConnectionError") as info:
        await ses.verify_domain("example.com")
    assert "testing" not in str(info.value)


# --- botocore Stubber: status mapping and the throttling retry path ---------------------------

async def stubbed(sleep: RecordingSleep, **kwargs: Any) -> tuple[SesClient, Stubber]:
    ses = SesClient(region=REGION, sleep=sleep, **kwargs)
    stubber = Stubber(await ses.boto_client())
    stubber.activate()
    return ses, stubber


async def test_status_mapping_of_every_ses_state() -> None:
    ses, stubber = await stubbed(RecordingSleep())
    raw = {"a.example": "Pending", "b.example": "Failed", "c.example": "TemporaryFailure",
           "d.example": "NotStarted", "e.example": "Success"}
    stubber.add_response(
        "get_identity_verification_attributes",
        {"VerificationAttributes": {
            d: {"VerificationStatus": s, "VerificationToken": "tok"} for d, s in raw.items()
        }},
        {"Identities": list(raw)},
    )
    stubber.add_response(
        "get_identity_dkim_attributes",
        {"DkimAttributes": {"a.example": {
            "DkimEnabled": True,
            "DkimVerificationStatus": "Pending",
            "DkimTokens": ["t1", "t2", "t3"],
        }}},
        {"Identities": list(raw)},
    )
    result = await ses.statuses(list(raw))
    stubber.assert_no_pending_responses()
    assert {d: s.status for d, s in result.items()} == {
        "a.example": "pending", "b.example": "failed", "c.example": "temporary_failure",
        "d.example": "not_started", "e.example": "success"}
    assert result["a.example"] == SesStatus("pending", "pending", "tok", ("t1", "t2", "t3"))
    assert result["b.example"].dkim_status is None


@pytest.mark.parametrize(
    "code",
    ["Throttling", "ThrottlingException", "TooManyRequestsException", "RequestLimitExceeded"],
)
async def test_throttling_is_retried_then_succeeds(code: str) -> None:
    sleep = RecordingSleep()
    ses, stubber = await stubbed(sleep, base_delay=0.5)
    for _ in range(2):
        stubber.add_client_error(
            "verify_domain_identity", service_error_code=code, http_status_code=400
        )
    stubber.add_response("verify_domain_identity", {"VerificationToken": "tok"})
    stubber.add_response("verify_domain_dkim", {"DkimTokens": ["x", "y", "z"]})

    identity = await ses.verify_domain("example.com")

    stubber.assert_no_pending_responses()
    assert identity == SesIdentity("tok", ("x", "y", "z"))
    assert len(sleep.delays) == 2
    assert 0.5 <= sleep.delays[0] <= 0.625 and 1.0 <= sleep.delays[1] <= 1.25


async def test_throttling_backs_off_exponentially_then_gives_up() -> None:
    sleep = RecordingSleep()
    ses, stubber = await stubbed(sleep, max_attempts=5, base_delay=0.5)
    for _ in range(5):
        stubber.add_client_error("get_identity_verification_attributes",
                                 service_error_code="Throttling", http_status_code=400)

    with pytest.raises(SesError, match="throttled after 5 attempts"):
        await ses.statuses(["example.com"])

    stubber.assert_no_pending_responses()  # exactly 5 calls were made
    assert len(sleep.delays) == 4
    for n, delay in enumerate(sleep.delays):
        assert 0.5 * 2**n <= delay <= 0.5 * 2**n * 1.25
    assert sleep.delays == sorted(sleep.delays)


async def test_other_client_error_is_not_retried() -> None:
    sleep = RecordingSleep()
    ses, stubber = await stubbed(sleep)
    stubber.add_client_error("verify_domain_identity", service_error_code="AccessDenied",
                             service_message="User arn:aws:iam::123:user/x is not authorized",
                             http_status_code=403)

    with pytest.raises(SesError) as info:
        await ses.verify_domain("example.com")

    stubber.assert_no_pending_responses()
    assert sleep.delays == []
    assert str(info.value) == "SES verify_domain_identity failed: AccessDenied"
