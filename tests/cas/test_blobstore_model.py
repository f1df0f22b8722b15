"""The blob store checked against a dict from digest to bytes."""

import shutil
import tempfile

import blake3
import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    Bundle,
    RuleBasedStateMachine,
    invariant,
    precondition,
    rule,
)

from cas import BlobStore, MissingBlobError

# A small alphabet of contents, so puts often repeat and deletes often hit.
contents = st.sampled_from([b"", b"a", b"ab", b"\0" * 4096, bytes(range(256))]) | (
    st.binary(max_size=512)
)


class BlobStoreMachine(RuleBasedStateMachine):
    digests = Bundle("digests")

    def __init__(self):
        super().__init__()
        self.root = tempfile.mkdtemp()
        self.store = BlobStore(self.root)
        self.model: dict[str, bytes] = {}

    def teardown(self):
        shutil.rmtree(self.root)

    @rule(target=digests, data=contents)
    def put(self, data):
        result = self.store.put(data)

        assert result.digest == blake3.blake3(data).hexdigest()
        assert result.written == (result.digest not in self.model)
        self.model[result.digest] = data
        return result.digest

    @rule(digest=digests)
    def delete(self, digest):
        freed = self.store.delete(digest)

        assert freed == len(self.model.pop(digest, b""))

    @rule(digest=digests)
    def get(self, digest):
        if digest in self.model:
            assert self.store.get(digest) == self.model[digest]
        else:
            with pytest.raises(MissingBlobError):
                self.store.get(digest)

    @precondition(lambda self: self.model)
    @rule()
    def verify_all(self):
        assert self.store.verify_all() == []

    @invariant()
    def lists_exactly_the_model(self):
        listed = {info.digest: info.size for info in self.store.iter_blobs()}

        assert listed == {d: len(data) for d, data in self.model.items()}


BlobStoreMachine.TestCase.settings = settings(
    max_examples=30, stateful_step_count=20, deadline=None
)
test_blob_store_behaves_like_a_dict_of_digest_to_bytes = BlobStoreMachine.TestCase
