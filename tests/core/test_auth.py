"""The challenge-response proofs of a cluster secret (sans-IO)."""

from __future__ import annotations

import pytest
from hypothesis import given, strategies as st

from trio_cluster import ConfigError
from trio_cluster._core._auth import (
    MAX_SECRETS,
    PROOF_SIZE,
    ClusterSecrets,
    proof_message,
)

SECRET = b"s" * 16
OTHER = b"o" * 16
PARTS = (b"dialer nonce", b"listener nonce", b"10.0.0.1:1", b"10.0.0.2:2")

parts = st.lists(st.binary(max_size=40), max_size=5).map(tuple)
labels = st.sampled_from(["listener", "dialer"])


@given(labels, parts)
def test_a_proof_checks_out_with_the_same_secret(label, message_parts):
    secrets = ClusterSecrets.of([SECRET])
    proofs = secrets.prove(label, message_parts)
    assert [len(proof) for proof in proofs] == [PROOF_SIZE]
    assert secrets.verify(label, message_parts, proofs)
    assert not ClusterSecrets.of([OTHER]).verify(label, message_parts, proofs)


@given(labels, parts, labels, parts)
def test_a_proof_is_good_for_its_own_label_and_parts_only(
    label, message_parts, other_label, other_parts
):
    secrets = ClusterSecrets.of([SECRET])
    proofs = secrets.prove(label, message_parts)
    same = (label, message_parts) == (other_label, other_parts)
    assert secrets.verify(other_label, other_parts, proofs) == same


def test_the_parts_are_delimited():
    # Moving bytes from one part to the next gives another message.
    assert proof_message("l", [b"ab", b"c"]) != proof_message("l", [b"a", b"bc"])
    assert proof_message("l", [b"", b"x"]) != proof_message("l", [b"x", b""])
    assert proof_message("la", [b"b"]) != proof_message("l", [b"ab"])


def test_a_rotation_accepts_either_secret():
    rotating = ClusterSecrets.of([OTHER, SECRET])
    old, new = ClusterSecrets.of([SECRET]), ClusterSecrets.of([OTHER])
    for member in (old, new):
        assert rotating.verify("dialer", PARTS, member.prove("dialer", PARTS))
        assert member.verify("dialer", PARTS, rotating.prove("dialer", PARTS))
    assert not old.verify("dialer", PARTS, new.prove("dialer", PARTS))


@pytest.mark.parametrize(
    "proofs",
    [
        None,
        b"p" * PROOF_SIZE,
        [],
        [b"p" * (PROOF_SIZE - 1)],
        ["p" * PROOF_SIZE],
        [b"p" * PROOF_SIZE] * (MAX_SECRETS + 1),
        {"proof": b"p" * PROOF_SIZE},
    ],
)
def test_anything_but_a_list_of_proofs_is_refused(proofs):
    assert not ClusterSecrets.of([SECRET]).verify("dialer", PARTS, proofs)


def test_too_many_proofs_are_refused_even_with_a_good_one():
    secrets = ClusterSecrets.of([SECRET])
    good = secrets.prove("dialer", PARTS)
    assert not secrets.verify("dialer", PARTS, good * (MAX_SECRETS + 1))


def test_secrets_are_kept_once_each_and_never_shown():
    secrets = ClusterSecrets.of([SECRET, SECRET.decode()])
    assert secrets.keys == (SECRET,)
    assert "s" * 16 not in repr(secrets)


@pytest.mark.parametrize(
    ("values", "match"),
    [
        ([], "empty"),
        ([b"x" * 15], "15 bytes"),
        ([SECRET] * (MAX_SECRETS + 1), "at most"),
        ([None], "bytes or str"),
        (SECRET, "not one secret"),
    ],
)
def test_bad_secrets(values, match):
    with pytest.raises(ConfigError, match=match):
        ClusterSecrets.of(values)
