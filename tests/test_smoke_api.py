"""First end-to-end checks of the running daemon."""
from tests.conftest import outbound


async def test_domain_mailbox_catch_all_and_policy_keepalive(daemon):
    await daemon.domain("example.com")
    status, user = await daemon.api("POST", "/users/", {"email": "Bob@Example.com",
                                                        "password": "s3cret-pass"})
    assert status == 201 and user["email"] == "bob@example.com" and "password" not in str(user)
    status, alias = await daemon.api("POST", "/aliases/", {"source": "@example.com",
                                                           "destinations": ["bob@example.com"]})
    assert status == 201 and alias["catch_all"] is True
    client = await daemon.policy()
    assert await client.ask(**outbound("bob@example.com")) == "DUNNO"
    assert (await client.ask(**outbound("bob@other.test"))).startswith("REJECT 5.7.1")
    status, out = await daemon.api("GET", "/domains/example.com/outbound")
    assert out["sent_today"] == 1
    await client.close()
