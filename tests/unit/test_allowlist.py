"""Storage allow lists (service.allowlist): a key may name only the S3 prefixes it was
given, matched on path segments and on canonical locations, so ``//`` spellings are
caught and ``.``/``..`` segments are refused. The same rules through HTTP (403/422 at
submit, local paths under the operator's root): tests/e2e/test_allowlist.py."""

from __future__ import annotations

import pytest

from drmerge.errors import MergeError
from service.allowlist import AccessList, AllowListError


def acl(*allow, read=()):
    return AccessList.parse(allow, read)


@pytest.mark.parametrize("uri, ok", [
    ("s3://bkt/team/", True),
    ("s3://bkt/team", True),
    ("s3://bkt/team/ft-1/", True),
    ("s3://bkt//team/", True),          # the engine reads this as team/ (leading slashes dropped)
    ("s3://bkt///team/ft-1//", True),    # canonical: s3://bkt/team/ft-1/
    ("s3://bkt/teamx/", False),         # a prefix of the name is not a path prefix
    ("s3://bkt//teamx/", False),
    ("s3://bkt/tea/", False),
    ("s3://bkt/", False),
    ("s3://bkt//", False),
    ("s3://bkt/other/", False),
    ("s3://bkt/Team/", False),          # S3 keys are case-sensitive
    ("s3://bkt-other/team/", False),
])
def test_prefix_matching_on_path_segments(uri, ok):
    assert acl("s3://bkt/team").allows(uri, write=True) is ok


@pytest.mark.parametrize("uri", [
    "s3://bkt/team/./ft/",              # S3 keeps '.', SeaweedFS refuses it, proxies drop it
    "s3://bkt/team/../other/",          # resolved, it leaves team/
    "s3://bkt/team/x/../ft/",           # resolved, it stays inside: still two readings
    "s3://bkt/team/x/../../other/",
    "s3://bkt/../team/",                # climbs out of the bucket
    "s3://bkt/./team/",
    "s3://bkt/team/a//b/",              # AWS keeps '//', SeaweedFS collapses it
    "s3://bkt/team\\..\\other/",        # SeaweedFS reads a backslash as '/'
    "s3://bk/team/",                    # not a valid bucket name
])
def test_spellings_that_storages_read_differently_are_invalid_whatever_the_list(uri):
    for access in (acl("s3://bkt/team"), acl("*"), acl()):
        with pytest.raises(MergeError) as e:
            access.allows(uri, write=True)
        assert e.value.code == "invalid_spec"


def test_whole_bucket_any_location_and_read_only_entries():
    whole = acl("s3://bkt")
    assert whole.allows("s3://bkt/anything/at/all/", write=True)
    assert not whole.allows("s3://bkt2/x/", write=True)
    assert acl("*").allows("s3://whatever/x/", write=True)
    mixed = acl("s3://out/team", read=["s3://models/base"])
    assert mixed.allows("s3://models/base/llama/", write=False)
    assert not mixed.allows("s3://models/base/llama/", write=True)
    assert mixed.allows("s3://out/team/run/", write=True)
    assert not acl().allows("s3://out/team/run/", write=False)  # no entries: nothing


@pytest.mark.parametrize("entry", ["gs://b/x", "s3://", "s3://B/x", "s3://b/a/../c", "s3://b/./c", "s3://b/a//c",
                                   "s3://bkt/a\\b", "/local/path", "", 42])
def test_malformed_entries_are_refused_when_the_key_is_made(entry):
    with pytest.raises(AllowListError):
        acl(entry)


def test_entries_are_stored_normalised():
    assert acl("s3://bkt/team", "*").write_entries == ("*", "s3://bkt/team/")
    assert acl(read=["s3://bkt//shared//"]).read_entries == ("s3://bkt/shared/",)
