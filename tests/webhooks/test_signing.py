"""Standard Webhooks signatures: `sign_webhook` and `verify_webhook`.

The reference vectors come from the Standard Webhooks reference library for
Python, github.com/standard-webhooks/standard-webhooks,
``libraries/python/tests/test_webhooks.py`` (commit 33d368b2): its secret,
message id and payload, the signature of ``test_sign_function``, the wrong
signature of ``test_invalid_signature_raises_error`` and the extra
signatures of ``test_multi_sig_payload_is_valid``.
"""

from __future__ import annotations

import base64
import hashlib
import hmac

import pytest

from trio_cluster.webhooks import (
    WebhookSignatureError,
    new_secret,
    sign_webhook,
    verify_webhook,
    webhook_headers,
)

# The reference library's vectors (see the module docstring).
SECRET = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"
MSG_ID = "msg_p5jXN8AQM9LWM0D4loKWxJek"
PAYLOAD = '{"test": 2432232314}'
TIMESTAMP = 1614265330
SIGNATURE = "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE="
WRONG_SIGNATURE = "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OA="
OTHER_SIGNATURES = (
    "v1,Ceo5qEr07ixe2NLpvHk3FH9bwy/WavXrAFQ/9tdO6mc=",
    "v2,Ceo5qEr07ixe2NLpvHk3FH9bwy/WavXrAFQ/9tdO6mc=",
)
TOLERANCE = 300


def headers(signature: str = SIGNATURE, timestamp: int = TIMESTAMP) -> dict[str, str]:
    return {
        "webhook-id": MSG_ID,
        "webhook-timestamp": str(timestamp),
        "webhook-signature": signature,
    }


def test_sign_matches_the_reference_vector() -> None:
    assert sign_webhook(SECRET, MSG_ID, TIMESTAMP, PAYLOAD) == SIGNATURE
    assert sign_webhook(SECRET, MSG_ID, TIMESTAMP, PAYLOAD.encode()) == SIGNATURE


def test_sign_without_the_prefix_and_with_raw_bytes() -> None:
    raw = base64.b64decode(SECRET.removeprefix("whsec_"))
    assert sign_webhook(SECRET.removeprefix("whsec_"), MSG_ID, TIMESTAMP, PAYLOAD) == (
        SIGNATURE
    )
    assert sign_webhook(raw, MSG_ID, TIMESTAMP, PAYLOAD) == SIGNATURE


def test_sign_is_hmac_sha256_of_id_timestamp_body() -> None:
    raw = base64.b64decode(SECRET.removeprefix("whsec_"))
    digest = hmac.new(
        raw, f"{MSG_ID}.{TIMESTAMP}.{PAYLOAD}".encode(), hashlib.sha256
    ).digest()
    assert "v1," + base64.b64encode(digest).decode() == SIGNATURE


def test_the_reference_vector_verifies() -> None:
    assert verify_webhook(headers(), PAYLOAD, SECRET, now=TIMESTAMP) == MSG_ID
    assert verify_webhook(headers(), PAYLOAD.encode(), SECRET, now=TIMESTAMP) == MSG_ID


def test_header_names_are_case_insensitive() -> None:
    upper = {name.title(): value for name, value in headers().items()}
    assert verify_webhook(upper, PAYLOAD, SECRET, now=TIMESTAMP) == MSG_ID


def test_the_reference_wrong_signature_fails() -> None:
    with pytest.raises(WebhookSignatureError, match="no matching signature"):
        verify_webhook(headers(WRONG_SIGNATURE), PAYLOAD, SECRET, now=TIMESTAMP)


def test_any_of_several_signatures_may_match() -> None:
    several = " ".join([*OTHER_SIGNATURES, SIGNATURE, OTHER_SIGNATURES[0]])
    assert verify_webhook(headers(several), PAYLOAD, SECRET, now=TIMESTAMP) == MSG_ID
    with pytest.raises(WebhookSignatureError):
        verify_webhook(
            headers(" ".join(OTHER_SIGNATURES)), PAYLOAD, SECRET, now=TIMESTAMP
        )


def test_a_changed_body_id_or_secret_fails() -> None:
    with pytest.raises(WebhookSignatureError):
        verify_webhook(headers(), PAYLOAD + " ", SECRET, now=TIMESTAMP)
    changed = {**headers(), "webhook-id": "msg_other"}
    with pytest.raises(WebhookSignatureError):
        verify_webhook(changed, PAYLOAD, SECRET, now=TIMESTAMP)
    with pytest.raises(WebhookSignatureError):
        verify_webhook(headers(), PAYLOAD, new_secret(), now=TIMESTAMP)


@pytest.mark.parametrize(
    "missing", ["webhook-id", "webhook-timestamp", "webhook-signature"]
)
def test_a_missing_header_fails(missing: str) -> None:
    found = headers()
    del found[missing]
    with pytest.raises(WebhookSignatureError, match="missing header"):
        verify_webhook(found, PAYLOAD, SECRET, now=TIMESTAMP)


def test_a_malformed_timestamp_fails() -> None:
    found = {**headers(), "webhook-timestamp": "hello"}
    with pytest.raises(WebhookSignatureError, match="malformed"):
        verify_webhook(found, PAYLOAD, SECRET, now=TIMESTAMP)


@pytest.mark.parametrize("offset", [-TOLERANCE - 1, TOLERANCE + 1])
def test_a_timestamp_out_of_tolerance_fails(offset: int) -> None:
    # As the reference's test_old_timestamp_fails / test_new_timestamp_fails.
    signed = sign_webhook(SECRET, MSG_ID, TIMESTAMP + offset, PAYLOAD)
    with pytest.raises(WebhookSignatureError, match="from now"):
        verify_webhook(
            headers(signed, TIMESTAMP + offset), PAYLOAD, SECRET, now=TIMESTAMP
        )
    within = TIMESTAMP + (TOLERANCE if offset > 0 else -TOLERANCE)
    signed = sign_webhook(SECRET, MSG_ID, within, PAYLOAD)
    assert verify_webhook(headers(signed, within), PAYLOAD, SECRET, now=TIMESTAMP)


def test_webhook_headers_are_the_three_standard_ones() -> None:
    assert webhook_headers(SECRET, MSG_ID, TIMESTAMP, PAYLOAD) == headers()


def test_bad_secrets_are_refused() -> None:
    with pytest.raises(ValueError, match="base64"):
        sign_webhook("whsec_not base64!", MSG_ID, TIMESTAMP, PAYLOAD)
    with pytest.raises(ValueError, match="empty"):
        sign_webhook("whsec_", MSG_ID, TIMESTAMP, PAYLOAD)
    with pytest.raises(TypeError):
        sign_webhook(12, MSG_ID, TIMESTAMP, PAYLOAD)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="24 to 64"):
        new_secret(8)


def test_new_secrets_are_random_and_usable() -> None:
    first, second = new_secret(), new_secret()
    assert first != second
    assert first.startswith("whsec_")
    signed = sign_webhook(first, MSG_ID, TIMESTAMP, PAYLOAD)
    assert verify_webhook(headers(signed), PAYLOAD, first, now=TIMESTAMP) == MSG_ID
