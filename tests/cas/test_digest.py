"""Digests: the official BLAKE3 vectors, every bytes-like input, the threaded path
and the validation that keeps hostile names out of the store."""

import blake3
import numpy as np
import pytest

from cas import DIGEST_HEX_LEN, check_digest, hash_bytes
from cas._digest import _THREADED_MIN

# First 32 bytes of the `hash` output of each case in the official
# BLAKE3-team/BLAKE3 test_vectors/test_vectors.json (input: byte i is i % 251).
OFFICIAL_VECTORS = {
    0: "af1349b9f5f9a1a6a0404dea36dcc9499bcb25c9adc112b7cc9a93cae41f3262",
    1: "2d3adedff11b61f14c886e35afa036736dcd87a74d27b5c1510225d0f592e213",
    1023: "10108970eeda3eb932baac1428c7a2163b0e924c9a9e25b35bba72b28f70bd11",
    1024: "42214739f095a406f3fc83deb889744ac00df831c10daa55189b5d121c855af7",
    1025: "d00278ae47eb27b34faecf67b4fe263f82d5412916c1ffd97c8cb7fb814b8444",
    2048: "e776b6028c7cd22a4d0ba182a8bf62205d2ef576467e838ed6f2529b85fba24a",
    2049: "5f4d72f40d7a5f82b15ca2b2e44b1de3c2ef86c426c95c1af0b6879522563030",
    3072: "b98cb0ff3623be03326b373de6b9095218513e64f1ee2edd2525c7ad1e5cffd2",
    3073: "7124b49501012f81cc7f11ca069ec9226cecb8a2c850cfe644e327d22d3e1cd3",
    4096: "015094013f57a5277b59d8475c0501042c0b642e531b0a1c8f58d2163229e969",
    4097: "9b4052b38f1c5fc8b1f9ff7ac7b27cd242487b3d890d15c96a1c25b8aa0fb995",
    5120: "9cadc15fed8b5d854562b26a9536d9707cadeda9b143978f319ab34230535833",
    5121: "628bd2cb2004694adaab7bbd778a25df25c47b9d4155a55f8fbd79f2fe154cff",
    6144: "3e2e5b74e048f3add6d21faab3f83aa44d3b2278afb83b80b3c35164ebeca205",
    6145: "f1323a8631446cc50536a9f705ee5cb619424d46887f3c376c695b70e0f0507f",
    7168: "61da957ec2499a95d6b8023e2b0e604ec7f6b50e80a9678b89d2628e99ada77a",
    7169: "a003fc7a51754a9b3c7fae0367ab3d782dccf28855a03d435f8cfe74605e7817",
    8192: "aae792484c8efe4f19e2ca7d371d8c467ffb10748d8a5a1ae579948f718a2a63",
    8193: "bab6c09cb8ce8cf459261398d2e7aef35700bf488116ceb94a36d0f5f1b7bc3b",
    16384: "f875d6646de28985646f34ee13be9a576fd515f76b5b0a26bb324735041ddde4",
    31744: "62b6960e1a44bcc1eb1a611a8d6235b6b4b78f32e7abc4fb4c6cdcce94895c47",
    102400: "bc3e3d41a1146b069abffad3c0d44860cf664390afce4d9661f7902e7943e085",
}


def official_input(length: int) -> bytes:
    return bytes(i % 251 for i in range(length))


@pytest.mark.parametrize("length", sorted(OFFICIAL_VECTORS))
def test_hash_bytes_matches_official_blake3_vector(length):
    data = official_input(length)

    digest = hash_bytes(data)

    assert digest == OFFICIAL_VECTORS[length]


@pytest.mark.parametrize(
    "wrap",
    [
        bytearray,
        memoryview,
        lambda data: memoryview(bytearray(data)),
        lambda data: np.frombuffer(data, dtype=np.uint8).copy(),
        lambda data: memoryview(np.frombuffer(data, dtype=np.float32).reshape(8, -1)),
    ],
    ids=["bytearray", "memoryview", "bytearray-view", "numpy", "numpy-2d-float32"],
)
def test_hash_bytes_of_any_buffer_equals_hash_of_its_bytes(wrap):
    data = official_input(1024)
    buffer = wrap(data)

    digest = hash_bytes(buffer)

    assert digest == OFFICIAL_VECTORS[1024]


@pytest.mark.parametrize(
    "size",
    [_THREADED_MIN - 1, _THREADED_MIN, _THREADED_MIN + 1, 2 * _THREADED_MIN + 4097],
)
def test_threaded_hash_of_a_large_buffer_equals_single_threaded_blake3(size):
    data = np.random.default_rng(size).integers(0, 256, size, dtype=np.uint8)

    digest = hash_bytes(memoryview(data))

    assert digest == blake3.blake3(data.tobytes(), max_threads=1).hexdigest()


def test_check_digest_returns_a_valid_digest_unchanged():
    digest = OFFICIAL_VECTORS[0]

    checked = check_digest(digest)

    assert checked is digest
    assert len(checked) == DIGEST_HEX_LEN


INVALID_DIGESTS = [
    OFFICIAL_VECTORS[0].upper(),
    OFFICIAL_VECTORS[0][:-1],
    OFFICIAL_VECTORS[0] + "0",
    "",
    "../" + OFFICIAL_VECTORS[0][3:],
    "../../etc/passwd",
    "ab/" + OFFICIAL_VECTORS[0][3:],
    "g" * 64,
    " " + OFFICIAL_VECTORS[0][1:],
    OFFICIAL_VECTORS[0] + "\n",
    OFFICIAL_VECTORS[0].encode(),
    None,
    0,
]


@pytest.mark.parametrize("digest", INVALID_DIGESTS, ids=repr)
def test_check_digest_refuses_anything_but_64_lowercase_hex(digest):
    with pytest.raises(ValueError, match="64 lowercase hex"):
        check_digest(digest)
