"""One canonical form per location, and one containment rule (drmerge.locations), as the
spec parser, the S3 storage and the output-vs-input check use them (issue 18, items 1,
2, 16). No servers: pure functions and parse_spec."""

from __future__ import annotations

import os

import pytest

from drmerge import locations
from drmerge.errors import MergeError
from drmerge.s3 import parse_s3_uri
from drmerge.spec import parse_spec

# ------------------------------------------------------------------ the canonical form


@pytest.mark.parametrize("written, canonical", [
    ("s3://bkt/team/ft", "s3://bkt/team/ft/"),
    ("s3://bkt/team/ft/", "s3://bkt/team/ft/"),
    ("s3://bkt//team/ft/", "s3://bkt/team/ft/"),        # the spelling that overwrote an input
    ("s3://bkt/team/ft//", "s3://bkt/team/ft/"),        # the spelling that let two jobs share an output
    ("s3://bkt///team/ft///", "s3://bkt/team/ft/"),
    ("s3://bkt", "s3://bkt/"),
    ("s3://bkt/", "s3://bkt/"),
    ("s3://bkt//", "s3://bkt/"),
    ("s3://bkt/a b/caf\u00e9/x%2Fy/", "s3://bkt/a b/caf\u00e9/x%2Fy/"),  # kept literally, as S3 does
    ("s3://my.bkt-1/x", "s3://my.bkt-1/x/"),
])
def test_s3_spellings_of_one_place_have_one_canonical_form(written, canonical):
    assert locations.canonical(written) == canonical
    assert locations.canonical(canonical) == canonical  # idempotent
    bucket, prefix = parse_s3_uri(written)  # the storage reads the same prefix
    assert f"s3://{bucket}/{prefix}" == canonical


@pytest.mark.parametrize("written, why", [
    ("s3://bkt/team/../other/", "'..' segment"),       # item 16: was a run-time 400 from the S3 server
    ("s3://bkt/team/x/../ft/", "'..' segment"),
    ("s3://bkt/../team/", "'..' segment"),
    ("s3://bkt/team/./ft/", "'.' segment"),
    ("s3://bkt/team/..", "'..' segment"),
    ("s3://bkt/team/a//b/", "empty path segment"),     # AWS keeps it, SeaweedFS collapses it
    ("s3://bkt/team\\ft/", "backslash"),               # SeaweedFS reads it as '/'
    ("s3://bkt/team/\x01/", "control character"),
    ("s3://bkt/team/a\tb/", "control character"),
    ("s3:///team/", "no bucket name"),
    ("s3://Bkt/team/", "valid S3 bucket"),
    ("s3://bk/team/", "valid S3 bucket"),
    ("s3://b..k/team/", "valid S3 bucket"),
    ("s3://bkt_x/team/", "valid S3 bucket"),
    ("gs://bkt/team/", "unsupported URI scheme"),
])
def test_spellings_that_storages_read_differently_are_refused(written, why):
    with pytest.raises(MergeError) as e:
        locations.canonical(written)
    assert e.value.code == "invalid_spec"
    assert why in e.value.message and repr(written) in e.value.message


def test_the_storage_refuses_the_same_spellings_as_the_spec():
    for uri in ("s3://b/a/../c/", "s3://b/./c/", "s3://b/a//c/", "s3://b/a\\c/"):
        with pytest.raises(MergeError):
            parse_s3_uri(uri)
    assert parse_s3_uri("s3://b") == ("b", "")  # bucket names are the spec's business, not the storage's


def test_local_paths_resolve_to_the_real_path(tmp_path):
    real = tmp_path / "real"
    (real / "ft").mkdir(parents=True)
    os.symlink(real, tmp_path / "link")
    canonical = os.path.realpath(real / "ft")
    for written in (str(real / "ft"), str(real / "ft") + "/", str(real / "x" / ".." / "ft"),
                    str(tmp_path / "link" / "ft"), str(tmp_path / "link" / "ft") + "//"):
        assert locations.canonical(written) == canonical, written
    assert locations.canonical("ft", base_dir=str(tmp_path / "link")) == canonical
    with pytest.raises(MergeError) as e:
        locations.canonical("ft", allow_relative=False)
    assert e.value.code == "invalid_spec" and "relative path" in e.value.message
    # a location that does not exist yet (an output) resolves as far as it exists
    assert locations.canonical(str(tmp_path / "link" / "new" / "out")) == os.path.join(os.path.realpath(real),
                                                                                        "new", "out")


# ------------------------------------------------------------------ containment


@pytest.mark.parametrize("a, b, how", [
    ("s3://b/team/ft/", "s3://b/team/ft/", "is"),
    ("s3://b/team/ft/sub/", "s3://b/team/ft/", "lies inside"),
    ("s3://b/team/", "s3://b/team/ft/", "contains"),
    ("s3://b/", "s3://b/team/ft/", "contains"),
    ("s3://b/team/ftx/", "s3://b/team/ft/", None),       # a longer name is a sibling, not inside
    ("s3://b/team/f/", "s3://b/team/ft/", None),
    ("s3://b2/team/ft/", "s3://b/team/ft/", None),
    ("s3://bb/", "s3://b/", None),
    ("/data/out", "/data/out", "is"),
    ("/data/out/sub", "/data/out", "lies inside"),
    ("/data", "/data/out", "contains"),
    ("/", "/data/out", "contains"),
    ("/data/outx", "/data/out", None),
    ("/s3:/b/x", "s3://b/x/", None),                     # a local path never overlaps an S3 location
])
def test_contains_and_overlaps_work_on_whole_segments(a, b, how):
    assert locations.relation(a, b) == how
    assert locations.overlaps(a, b) is (how is not None) and locations.overlaps(b, a) is (how is not None)
    assert locations.contains(b, a) is (how in ("is", "lies inside"))
    assert locations.contains(a, b) is (how in ("is", "contains"))


def test_the_predicates_refuse_locations_that_are_not_canonical():
    for loc in ("s3://b//x/", "s3://b/x", "relative/path", "/data/../out"):
        with pytest.raises(ValueError):
            locations.contains("s3://b/", loc)


@pytest.mark.parametrize("loc, parents", [
    ("s3://b/", []),
    ("s3://b/x/", ["s3://b/"]),
    ("s3://b/x/y/z/", ["s3://b/", "s3://b/x/", "s3://b/x/y/"]),
    ("/", []),
    ("/data", ["/"]),
    ("/data/out", ["/", "/data/"]),
])
def test_parents_are_every_enclosing_location_outermost_first(loc, parents):
    assert locations.parents(loc) == parents
    assert all(locations.contains(p, loc) and p != locations.as_prefix(loc) for p in parents)


# ------------------------------------------------------------------ the spec's output rule


def s3_spec(output, **kw):
    return {"base_model": "s3://shared/alpha/base/", "models": [{"model": "s3://shared/alpha/victim-in/"},
                                                               {"model": "s3://shared/alpha/other-ft/"}],
            "output": output, "overwrite": True, **kw}


@pytest.mark.parametrize("output, how, param", [
    ("s3://shared//alpha/victim-in/", "is", "models[0].model"),     # issue 18 item 1, verbatim
    ("s3://shared/alpha/victim-in//", "is", "models[0].model"),
    ("s3://shared/alpha/victim-in", "is", "models[0].model"),
    ("s3://shared/alpha/base", "is", "base_model"),
    ("s3://shared/alpha/victim-in/merged/", "lies inside", "models[0].model"),
    ("s3://shared//alpha/other-ft/sub", "lies inside", "models[1].model"),
    ("s3://shared/alpha/", "contains", "base_model"),  # overwrite would clear every input
    ("s3://shared/", "contains", "base_model"),
])
def test_an_output_overlapping_an_input_is_refused_naming_both(output, how, param):
    with pytest.raises(MergeError) as e:
        parse_spec(s3_spec(output))
    err = e.value
    assert (err.code, err.param) == ("invalid_spec", "output")
    canonical = locations.canonical(output)
    spec_input = {"base_model": "s3://shared/alpha/base/", "models[0].model": "s3://shared/alpha/victim-in/",
                  "models[1].model": "s3://shared/alpha/other-ft/"}[param]
    assert f"{canonical}" in err.message and f" {how} the input {param} {spec_input}" in err.message


def test_outputs_beside_the_inputs_are_fine_and_come_back_canonical():
    spec = parse_spec(s3_spec("s3://shared//alpha/victim-in-merged//"))
    assert spec.output == "s3://shared/alpha/victim-in-merged/"
    assert spec.to_dict()["output"] == spec.output
    assert [m.model for m in spec.models] == ["s3://shared/alpha/victim-in/", "s3://shared/alpha/other-ft/"]
    with pytest.raises(MergeError) as e:  # an override is validated like a new spec
        spec.with_overrides(output="s3://shared//alpha/victim-in")
    assert e.value.param == "output"


def test_a_local_output_reached_through_a_symlink_is_an_input(tmp_path):
    (tmp_path / "ft").mkdir()
    os.symlink(tmp_path / "ft", tmp_path / "alias")
    data = {"models": [str(tmp_path / "ft")], "method": "linear", "overwrite": True}
    for output, how in [(str(tmp_path / "alias"), "is"), (str(tmp_path / "alias" / "out"), "lies inside"),
                        (str(tmp_path), "contains"), (str(tmp_path / "ft" / ".." / "ft"), "is")]:
        with pytest.raises(MergeError) as e:
            parse_spec(dict(data, output=output))
        assert e.value.param == "output" and f" {how} the input models[0].model " in e.value.message, output
    assert parse_spec(dict(data, output=str(tmp_path / "ftx"))).output == os.path.realpath(tmp_path / "ftx")


def test_dot_segments_are_refused_at_parse_time_naming_the_param():
    with pytest.raises(MergeError) as e:
        parse_spec(s3_spec("s3://shared/alpha/out/", models=[{"model": "s3://shared/alpha/x/../victim-in/"}]))
    assert (e.value.code, e.value.param) == ("invalid_spec", "models[0].model")
    assert "'..' segment" in e.value.message
