"""The signing primitives without a server: the HMAC is the standard one, the signed bytes
are the RESP the encoder writes, and the verifier rebuilds exactly those bytes."""

from __future__ import annotations

import hmac
from types import MappingProxyType

import hiredis
import pytest

from agentstreams._codec import encode_event, encode_event_resp
from agentstreams._signing import SigningKeys, _Pads

KEYS = {"k2": b"unit-k2-secret-0123456789abcdef", "k1": b"unit-k1-secret-0123456789abcdef"}


@pytest.mark.parametrize("key", [b"k" * 16, b"\x00" * 32, b"k" * 64, b"k" * 65, b"k" * 300])
@pytest.mark.parametrize("message", [b"", b"abc", bytes(range(256)) * 9])
def test_precomputed_pads_are_hmac_sha256(key: bytes, message: bytes) -> None:
    assert _Pads(key).hexdigest(message) == hmac.digest(key, message, "sha256").hex()


def test_the_signature_is_an_hmac_of_the_stream_and_the_entrys_resp() -> None:
    fields = {"who": "é", "n": 1, "blob": "x" * 5000}
    nargs, body = encode_event_resp("t", fields, event_id="e" * 32, timestamp=1.5)
    signed_nargs, signed = encode_event_resp(
        "t", fields, event_id="e" * 32, timestamp=1.5,
        signer=SigningKeys(KEYS).signer("s{1}"))
    assert signed_nargs == nargs + 4
    kid_pair = "$4\r\n_kid\r\n$2\r\nk2\r\n"
    assert signed.startswith(body + kid_pair)
    message = (b"$18\r\nagentstreams-sig-1\r\n$4\r\ns{1}\r\n" + kid_pair.encode()
               + body.encode())
    expected = hmac.digest(KEYS["k2"], message, "sha256").hex()
    assert signed == f"{body}{kid_pair}$4\r\n_sig\r\n$64\r\n{expected}\r\n"
    reader = hiredis.Reader()
    reader.feed(f"*{signed_nargs}\r\n{signed}".encode())
    values = reader.gets()
    entry = dict(zip(values[::2], values[1::2], strict=True))
    verifier = SigningKeys(KEYS).verifier("s{1}")
    assert verifier.problem(entry) is None
    assert entry == encode_event("t", fields, event_id="e" * 32, timestamp=1.5,
                                 signer=SigningKeys(KEYS).signer("s{1}"))
    # any change, another stream, a key only the other side knows
    assert verifier.problem({**entry, b"n": b"2"}) is not None
    assert SigningKeys(KEYS).verifier("s{2}").problem(entry) is not None
    assert SigningKeys({"k2": b"another-secret-of-enough-bytes"}).verifier("s{1}").problem(
        entry) is not None
    assert SigningKeys({"k1": KEYS["k1"]}).verifier("s{1}").problem(entry) is not None
    # a rotation's second key verifies
    assert SigningKeys({"k9": b"a-new-key-0123456789abcdef", **KEYS}).verifier(
        "s{1}").problem(entry) is None


def test_an_entry_read_in_another_order_or_as_another_mapping_verifies_the_same_way() -> None:
    keys = SigningKeys(KEYS)
    entry = encode_event("t", {"a": "1", "b": "2"}, signer=keys.signer("s"))
    verifier = keys.verifier("s")
    assert verifier.problem(entry) is None
    # not a dict: the careful path, same answer
    assert verifier.problem(MappingProxyType(entry)) is None
    moved = {b"_sig": entry[b"_sig"], b"_kid": entry[b"_kid"],
             **{k: v for k, v in entry.items() if k not in (b"_sig", b"_kid")}}
    assert verifier.problem(moved) is None  # where _kid and _sig sit is not signed
    assert verifier.problem({**entry, b"_grp": b"g"}) is None  # a replay's routing
    assert verifier.problem({**entry, b"_grp": b"g", b"x": b"1"}) is not None
    swapped = {b"b": entry[b"b"], b"a": entry[b"a"],
               **{k: v for k, v in entry.items() if k not in (b"a", b"b")}}
    assert verifier.problem(swapped) is not None  # the order of signed fields is
