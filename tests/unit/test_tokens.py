"""Tokens, identities and the Kafka client's security options (no sockets)."""

from __future__ import annotations

import asyncio

import msgspec
import pytest

from eventbroker import _fastpath as fp
from eventbroker.config import AuthConfig, AuthProducer, KafkaConfig
from eventbroker.kafka.sink import client_security
from eventbroker.security.tokens import create_token


def test_kafka_sasl_and_tls_options_reach_aiokafka(tmp_path):
    pw = tmp_path / "pw"
    pw.write_text("s3cret\n")
    kw = client_security(KafkaConfig(security_protocol="SASL_PLAINTEXT", sasl_mechanism="SCRAM-SHA-512",
                                     sasl_username="eb", sasl_password_file=str(pw)))
    assert kw == {"security_protocol": "SASL_PLAINTEXT", "sasl_mechanism": "SCRAM-SHA-512",
                  "sasl_plain_username": "eb", "sasl_plain_password": "s3cret"}
    with pytest.raises(msgspec.ValidationError, match="SASL needs"):
        msgspec.convert({"security_protocol": "SASL_SSL"}, KafkaConfig)
    from aiokafka.client import AIOKafkaClient

    async def build():
        return AIOKafkaClient(bootstrap_servers="127.0.0.1:1", **kw)

    client = asyncio.run(build())  # aiokafka accepts every option as given
    assert client._sasl_mechanism == "SCRAM-SHA-512" and client._security_protocol == "SASL_PLAINTEXT"


def test_forbidden_is_reason_5_on_the_wire():
    from eventbroker.protocol import Reason

    assert Reason.FORBIDDEN == fp.REASON_FORBIDDEN == 5


def test_a_certificate_only_producer_cannot_be_claimed_with_an_empty_or_odd_secret():
    """A producer with no token hashes (certificate only) must not accept any
    token, and secrets must be exactly 43 base64url characters."""
    from eventbroker.errors import AuthFailed
    from eventbroker.security.tokens import Authenticator

    token, digest = create_token("checkout")
    auth = Authenticator({"billing": AuthProducer(cert_subject="billing", types=["payment"]),
                          "checkout": AuthProducer(token_hashes=[digest], types=["play"])})
    secret = token.split(".", 2)[2]
    for bad in (b"ebt1.billing.", b"ebt1.billing.====", b"ebt1.billing." + secret.encode(),
                b"ebt1.checkout.", b"ebt1.checkout." + secret[:-1].encode(), b"ebt1.checkout." + secret.encode() + b"=",
                b"ebt1.checkout." + secret.encode() + b"!", b"ebt1.checkout.!" + secret[1:].encode()):
        with pytest.raises(AuthFailed):
            auth.by_token(bad)
    assert auth.by_token(token.encode()).name == "checkout"


def test_two_producers_cannot_share_a_certificate_subject():
    with pytest.raises(msgspec.ValidationError, match="same cert_subject"):
        msgspec.convert({"producers": {"a": {"cert_subject": "x"}, "b": {"cert_subject": "x"}}}, AuthConfig)


def test_only_the_canonical_spelling_of_a_token_passes():
    """The 43rd base64url character carries 2 spare bits: the three other
    spellings decode to the same secret and must not pass."""
    from eventbroker.errors import AuthFailed
    from eventbroker.security.tokens import Authenticator

    token, digest = create_token("checkout")
    auth = Authenticator({"checkout": AuthProducer(token_hashes=[digest], types=["play"])})
    assert auth.by_token(token.encode()).name == "checkout"
    alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"
    last = alphabet.index(token[-1])
    for spare in (1, 2, 3):
        other = token[:-1] + alphabet[last | spare]
        with pytest.raises(AuthFailed):
            auth.by_token(other.encode())
