#!/usr/bin/env python3
"""Lifeboat's S3 gateway as boto3 sees it. Env: S3_ENDPOINT, BUCKET (owned by
FULL), FULL_/RO_/AO_ (append-only, writable `locks/`)/OTHER_ (another tenant)
KEY and SECRET. One line per check group; exits non-zero naming each failure."""

import base64
import datetime
import hashlib
import http.client
import logging
import os
import sys
import traceback
import urllib.error
import urllib.parse
import urllib.request
import uuid

import boto3
from botocore.config import Config
from botocore.exceptions import ClientError
from botocore.handlers import set_list_objects_encoding_type_url

MiB = 1 << 20
ENDPOINT = os.environ["S3_ENDPOINT"]
BUCKET = os.environ["BUCKET"]
RUN = "sdk-" + uuid.uuid4().hex[:10]
PREFIX = RUN + "/"  # every key this run writes in BUCKET (except locks/)
LOCKS = "locks/" + PREFIX  # the append-only credential's writable prefix


class CheckFailed(Exception):
    pass


def check(cond, what):
    if not cond:
        raise CheckFailed(what)


def eq(got, want, what):
    if got != want:
        shown = lambda v: repr(v) if len(repr(v)) < 200 else repr(v)[:200] + "..."
        raise CheckFailed(f"{what}: got {shown(got)}, want {shown(want)}")


class BodyWithheld(logging.Handler):
    """Notes each time botocore got a final answer instead of `100 Continue`
    to an upload's `Expect: 100-continue`, and so never sent the body."""
    seen = False

    def emit(self, record):
        if "NOT sending request body" in record.getMessage():
            BodyWithheld.seen = True


logging.getLogger("botocore.awsrequest").addHandler(BodyWithheld())
logging.getLogger("botocore.awsrequest").setLevel(logging.DEBUG)
CLIENTS = []
DEFERRED = []  # failures that do not stop their group (see expect_error)


def expect_error(code, fn, status=None, what=""):
    """fn() must fail with S3 error `code` (and HTTP `status` if given).

    An error answered before the upload's body was read must also say
    `Connection: close` (RFC 9110 10.1.1; S3 does): botocore withholds the
    body and reuses the connection, so the server would take the start of
    the next request as that body. Recorded without stopping the group, and
    connections are dropped so later checks do not trip on it."""
    BodyWithheld.seen = False
    try:
        fn()
    except ClientError as e:
        headers = e.response.get("ResponseMetadata", {}).get("HTTPHeaders", {})
        if BodyWithheld.seen and headers.get("connection", "").lower() != "close":
            DEFERRED.append(f"{what}: {code} answered before the body was read, "
                            f"without Connection: close")
            print(f"FAIL connection reuse: {DEFERRED[-1]}", flush=True)
            for c in CLIENTS:
                c.close()
        got = e.response.get("Error", {}).get("Code")
        got_status = e.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
        check(got == code, f"{what}: want error {code}, got {got} "
                           f"(HTTP {got_status}): {e.response.get('Error')}")
        if status is not None:
            eq(got_status, status, f"{what}: HTTP status of {code}")
        return e
    raise CheckFailed(f"{what}: want error {code}, but the call succeeded")


def client(key, secret, endpoint=ENDPOINT, style="path"):
    # No retries at all (legacy `max_attempts: 1` would still retry once,
    # e.g. on BadDigest, and could hide a flaky answer).
    c = boto3.client(
        "s3", endpoint_url=endpoint, region_name="us-east-1",
        aws_access_key_id=key, aws_secret_access_key=secret,
        config=Config(signature_version="s3v4", retries={"total_max_attempts": 1},
                      s3={"addressing_style": style}))
    CLIENTS.append(c)
    return c


FULL = client(os.environ["FULL_KEY"], os.environ["FULL_SECRET"])
RO = client(os.environ["RO_KEY"], os.environ["RO_SECRET"])
AO = client(os.environ["AO_KEY"], os.environ["AO_SECRET"])
OTHER = client(os.environ["OTHER_KEY"], os.environ["OTHER_SECRET"])


def keys(r):
    return [o["Key"] for o in r.get("Contents", [])]


def md5_etag(data):
    return '"' + hashlib.md5(data).hexdigest() + '"'


def get_body(c, key, **kw):
    return c.get_object(Bucket=BUCKET, Key=key, **kw)["Body"].read()


def put(c, key, body, **kw):
    return c.put_object(Bucket=BUCKET, Key=key, Body=body, **kw)


def all_versions(prefix, c=FULL, bucket=BUCKET):
    """(versions, delete markers) of keys under prefix, across pages."""
    versions, markers, kw = [], [], {}
    while True:
        r = c.list_object_versions(Bucket=bucket, Prefix=prefix, **kw)
        versions += r.get("Versions", [])
        markers += r.get("DeleteMarkers", [])
        if not r.get("IsTruncated"):
            return versions, markers
        kw = {"KeyMarker": r["NextKeyMarker"], "VersionIdMarker": r["NextVersionIdMarker"]}


def purge(c, bucket, prefix=""):
    """Deletes every version and delete marker under prefix."""
    versions, markers = all_versions(prefix, c, bucket)
    for v in versions + markers:
        c.delete_object(Bucket=bucket, Key=v["Key"], VersionId=v["VersionId"])


# CreateBucket / HeadBucket / ListBuckets / GetBucketLocation /
# GetBucketVersioning / DeleteBucket, and bucket names unique across tenants.
def test_buckets():
    mine, theirs = RUN + "-mine", RUN + "-theirs"
    FULL.create_bucket(Bucket=mine)
    expect_error("BucketAlreadyOwnedByYou", lambda: FULL.create_bucket(Bucket=mine),
                 409, "CreateBucket of own existing name")
    OTHER.create_bucket(Bucket=theirs)
    expect_error("BucketAlreadyExists", lambda: FULL.create_bucket(Bucket=theirs),
                 409, "CreateBucket of another tenant's name")
    expect_error("InvalidBucketName", lambda: FULL.create_bucket(Bucket="Bad_Name"),
                 400, "CreateBucket Bad_Name")

    eq(FULL.head_bucket(Bucket=mine)["ResponseMetadata"]["HTTPStatusCode"], 200, "HeadBucket own")
    expect_error("404", lambda: FULL.head_bucket(Bucket=RUN + "-missing"), 404,
                 "HeadBucket missing")
    expect_error("403", lambda: FULL.head_bucket(Bucket=theirs), 403,
                 "HeadBucket of another tenant's bucket")

    names = {b["Name"] for b in FULL.list_buckets()["Buckets"]}
    check({mine, BUCKET} <= names, f"ListBuckets (demo) lacks own buckets: {names}")
    check(theirs not in names, f"ListBuckets (demo) shows the other tenant's: {names}")
    names = {b["Name"] for b in OTHER.list_buckets()["Buckets"]}
    check(theirs in names and BUCKET not in names, f"ListBuckets (other): {names}")

    loc = FULL.get_bucket_location(Bucket=mine).get("LocationConstraint")
    check(loc in (None, "", "us-east-1"), f"GetBucketLocation: {loc!r}")
    eq(FULL.get_bucket_versioning(Bucket=mine).get("Status"), "Enabled", "GetBucketVersioning")

    FULL.put_object(Bucket=mine, Key="x", Body=b"x")
    expect_error("BucketNotEmpty", lambda: FULL.delete_bucket(Bucket=mine), 409,
                 "DeleteBucket non-empty")
    purge(FULL, mine)
    FULL.delete_bucket(Bucket=mine)
    expect_error("NoSuchBucket", lambda: FULL.list_objects_v2(Bucket=mine), 404,
                 "ListObjectsV2 of a deleted bucket")
    expect_error("NoSuchBucket", lambda: FULL.delete_bucket(Bucket=mine), 404,
                 "DeleteBucket again")
    OTHER.delete_bucket(Bucket=theirs)


# PutObject/GetObject round trips, metadata, ETag, checksums, bad digests,
# key length limits, DeleteObject and If-None-Match on PUT.
def test_objects():
    k = PREFIX + "obj/"
    r = put(FULL, k + "empty", b"")
    eq(r["ETag"], md5_etag(b""), "ETag of empty object")
    g = FULL.get_object(Bucket=BUCKET, Key=k + "empty")
    eq(g["Body"].read(), b"", "empty object body")
    eq(g["ContentLength"], 0, "empty object ContentLength")

    small = b"hello, lifeboat\n"
    r = put(FULL, k + "small", small, Metadata={"a": "b"}, ContentType="text/x-test")
    eq(r["ETag"], md5_etag(small), "ETag of small object")
    g = FULL.get_object(Bucket=BUCKET, Key=k + "small")
    eq(g["Body"].read(), small, "small object body")
    eq(g["Metadata"], {"a": "b"}, "user metadata")
    eq(g["ContentType"], "text/x-test", "ContentType")
    eq(g["ETag"], md5_etag(small), "GetObject ETag")
    h = FULL.head_object(Bucket=BUCKET, Key=k + "small")
    eq(h["ContentLength"], len(small), "HeadObject ContentLength")
    eq(h["ETag"], md5_etag(small), "HeadObject ETag")
    eq(h["Metadata"], {"a": "b"}, "HeadObject metadata")
    expect_error("404", lambda: FULL.head_object(Bucket=BUCKET, Key=k + "missing"),
                 404, "HeadObject missing key")
    expect_error("NoSuchKey", lambda: get_body(FULL, k + "missing"), 404, "GetObject missing key")

    big = os.urandom(3 * MiB + 12345)
    r = put(FULL, k + "big", big)
    eq(r["ETag"], md5_etag(big), "ETag of 3 MiB object")
    check(get_body(FULL, k + "big") == big, "3 MiB object round trip")

    wrong_md5 = base64.b64encode(hashlib.md5(b"other").digest()).decode()
    expect_error("BadDigest", lambda: put(FULL, k + "bad", b"data", ContentMD5=wrong_md5),
                 400, "PutObject wrong Content-MD5")
    expect_error("InvalidDigest",
                 lambda: put(FULL, k + "bad", b"data", ContentMD5="notbase64!!"),
                 400, "PutObject malformed Content-MD5")
    right_md5 = base64.b64encode(hashlib.md5(b"data").digest()).decode()
    put(FULL, k + "md5ok", b"data", ContentMD5=right_md5)
    put(FULL, k + "crc", b"data", ChecksumAlgorithm="CRC32")
    eq(get_body(FULL, k + "crc"), b"data", "PutObject with CRC32 checksum")
    expect_error("BadDigest",
                 lambda: put(FULL, k + "bad", b"data", ChecksumCRC32="AAAAAA=="),
                 400, "PutObject wrong ChecksumCRC32")
    expect_error("NoSuchKey", lambda: get_body(FULL, k + "bad"), 404,
                 "a PUT refused for its digest leaves no object")

    expect_error("KeyTooLongError", lambda: put(FULL, k + "x" * (1025 - len(k)), b"x"),
                 400, "PutObject key of 1025 bytes")
    long_ok = k + "y" * (1024 - len(k))
    put(FULL, long_ok, b"y")
    eq(get_body(FULL, long_ok), b"y", "key of 1024 bytes")

    FULL.delete_object(Bucket=BUCKET, Key=k + "small")
    expect_error("NoSuchKey", lambda: get_body(FULL, k + "small"), 404,
                 "GetObject after DeleteObject")

    expect_error("PreconditionFailed",
                 lambda: put(FULL, k + "big", b"new", IfNoneMatch="*"), 412,
                 "PutObject If-None-Match * on an existing key")
    put(FULL, k + "fresh", b"new", IfNoneMatch="*")
    eq(get_body(FULL, k + "fresh"), b"new", "PutObject If-None-Match * on a new key")
    check(get_body(FULL, k + "big") == big, "If-None-Match refusal kept the old object")


# GetObject Range (prefix, open, suffix, across 1 MiB chunks, unsatisfiable)
# and conditional GETs (If-Match, If-None-Match, If-(Un)Modified-Since).
def test_ranges_and_conditions():
    key = PREFIX + "range"
    data = os.urandom(3 * MiB)
    etag = put(FULL, key, data)["ETag"]
    for rng, want in [("bytes=0-9", data[:10]), ("bytes=100-", data[100:]),
                      ("bytes=-5", data[-5:]),
                      ("bytes=1048570-1048590", data[MiB - 6:MiB + 15]),
                      ("bytes=1048000-2098000", data[1048000:2098001])]:
        g = FULL.get_object(Bucket=BUCKET, Key=key, Range=rng)
        eq(g["ResponseMetadata"]["HTTPStatusCode"], 206, f"Range {rng} status")
        check(g["Body"].read() == want, f"Range {rng} body")
        eq(g["ContentLength"], len(want), f"Range {rng} ContentLength")
        first = len(data) - len(want) if rng.startswith("bytes=-") else int(rng[6:].split("-")[0])
        eq(g["ContentRange"], f"bytes {first}-{first + len(want) - 1}/{len(data)}",
           f"Range {rng} Content-Range")
    expect_error("InvalidRange", lambda: get_body(FULL, key, Range=f"bytes={len(data)}-"),
                 416, "Range beyond the size")

    eq(get_body(FULL, key, IfMatch=etag)[:10], data[:10], "If-Match right etag")
    expect_error("PreconditionFailed", lambda: get_body(FULL, key, IfMatch='"0000"'), 412,
                 "If-Match wrong etag")
    expect_error("304", lambda: get_body(FULL, key, IfNoneMatch=etag), 304,
                 "If-None-Match matching etag")
    eq(len(get_body(FULL, key, IfNoneMatch='"0000"')), len(data), "If-None-Match other etag")
    now = datetime.datetime.now(datetime.timezone.utc)
    future, past = now + datetime.timedelta(days=1), now - datetime.timedelta(days=1)
    expect_error("304", lambda: get_body(FULL, key, IfModifiedSince=future), 304,
                 "If-Modified-Since in the future")
    eq(len(get_body(FULL, key, IfModifiedSince=past)), len(data), "If-Modified-Since past")
    expect_error("PreconditionFailed", lambda: get_body(FULL, key, IfUnmodifiedSince=past),
                 412, "If-Unmodified-Since in the past")
    eq(len(get_body(FULL, key, IfUnmodifiedSince=future)), len(data),
       "If-Unmodified-Since in the future")
    expect_error("PreconditionFailed",
                 lambda: get_body(FULL, key, IfMatch='"0000"', Range="bytes=0-1"),
                 412, "If-Match wrong etag with Range")


# Versioning: VersionIds, reading old versions, ListObjectVersions, delete
# markers, deleting a specific version, unknown and 'null' VersionIds.
def test_versions():
    key = PREFIX + "versioned"
    v1 = put(FULL, key, b"first")["VersionId"]
    v2 = put(FULL, key, b"second")["VersionId"]
    check(v1.isdigit() and v2.isdigit(), f"VersionIds are decimal: {v1!r}, {v2!r}")
    check(v1 != v2, "two PUTs have distinct VersionIds")
    eq(get_body(FULL, key, VersionId=v1), b"first", "GetObject first VersionId")
    g = FULL.get_object(Bucket=BUCKET, Key=key)
    eq((g["Body"].read(), g.get("VersionId")), (b"second", v2), "GetObject latest")
    eq(get_body(FULL, key, VersionId="null"), b"second", "VersionId=null is the latest")
    expect_error("NoSuchVersion", lambda: get_body(FULL, key, VersionId="999999999"), 404,
                 "GetObject unknown VersionId")

    versions, markers = all_versions(key)
    eq(sorted((v["VersionId"], v["IsLatest"]) for v in versions),
       sorted([(v1, False), (v2, True)]), "ListObjectVersions after two PUTs")
    eq(markers, [], "no delete markers yet")

    d = FULL.delete_object(Bucket=BUCKET, Key=key)
    check(d.get("DeleteMarker") is True, f"DeleteObject reports a delete marker: {d}")
    dm = d.get("VersionId")
    expect_error("NoSuchKey", lambda: get_body(FULL, key), 404, "GetObject after delete")
    versions, markers = all_versions(key)
    eq([(m["VersionId"], m["IsLatest"]) for m in markers], [(dm, True)],
       "ListObjectVersions shows the delete marker as latest")
    check(all(not v["IsLatest"] for v in versions), "no version latest under a marker")
    eq(get_body(FULL, key, VersionId=v2), b"second", "old version readable under a marker")

    FULL.delete_object(Bucket=BUCKET, Key=key, VersionId=dm)
    eq(get_body(FULL, key), b"second", "deleting the delete marker restores the object")
    r = FULL.delete_object(Bucket=BUCKET, Key=key, VersionId=v2)
    eq(r.get("VersionId"), v2, "DeleteObject(VersionId) echoes the version")
    eq(get_body(FULL, key), b"first", "deleting the newest version restores the previous")
    versions, markers = all_versions(key)
    eq([(v["VersionId"], v["IsLatest"]) for v in versions], [(v1, True)],
       "ListObjectVersions after deleting the newest version")
    expect_error("NoSuchVersion", lambda: get_body(FULL, key, VersionId=v2), 404,
                 "GetObject of a deleted version")


# ListObjectsV2 (prefix, delimiter, pagination, StartAfter, url encoding,
# FetchOwner) and ListObjects v1 with Marker pagination.
def test_listing():
    p = PREFIX + "p/"
    names = ["a", "b", "sub/c", "sub/d", "z", "ü x"]
    for n in names:
        put(FULL, p + n, n.encode())
    want = sorted(p + n for n in names)
    shallow = sorted([p + "a", p + "b", p + "sub/", p + "z", p + "ü x"])

    r = FULL.list_objects_v2(Bucket=BUCKET, Prefix=p)
    eq(keys(r), want, "ListObjectsV2 Prefix")
    eq(r["KeyCount"], len(names), "ListObjectsV2 KeyCount")
    check(not r["IsTruncated"], "ListObjectsV2 not truncated")
    eq({o["Key"]: o["Size"] for o in r["Contents"]}[p + "sub/c"], 5, "listed Size")
    eq(r["Contents"][0]["ETag"], md5_etag(b"a"), "listed ETag")
    check("Owner" not in r["Contents"][0], "no Owner without FetchOwner")

    r = FULL.list_objects_v2(Bucket=BUCKET, Prefix=p, Delimiter="/")
    eq(keys(r), sorted(p + n for n in names if "/" not in n), "ListObjectsV2 Delimiter keys")
    eq([c["Prefix"] for c in r["CommonPrefixes"]], [p + "sub/"], "CommonPrefixes")

    seen, kw, pages = [], {}, 0
    while True:
        r = FULL.list_objects_v2(Bucket=BUCKET, Prefix=p, MaxKeys=2, **kw)
        pages += 1
        check(len(r.get("Contents", [])) <= 2, "MaxKeys=2 respected")
        seen += keys(r)
        if not r["IsTruncated"]:
            break
        kw = {"ContinuationToken": r["NextContinuationToken"]}
        check(pages < 10, "ContinuationToken pagination ends")
    eq(seen, want, "MaxKeys=2 pagination covers every key once")
    eq(pages, 3, "pages of 2 keys")

    seen = []
    for page in FULL.get_paginator("list_objects_v2").paginate(
            Bucket=BUCKET, Prefix=p, Delimiter="/", PaginationConfig={"PageSize": 1}):
        seen += [o["Key"] for o in page.get("Contents", [])]
        seen += [c["Prefix"] for c in page.get("CommonPrefixes", [])]
    eq(sorted(seen), shallow, "ListObjectsV2 Delimiter pagination (page size 1)")
    eq(len(seen), len(set(seen)), "no duplicates across delimiter pages")

    r = FULL.list_objects_v2(Bucket=BUCKET, Prefix=p, StartAfter=p + "sub/c")
    eq(keys(r), [p + "sub/d", p + "z", p + "ü x"], "StartAfter")
    # botocore asks for EncodingType=url itself (and decodes) unless the
    # caller does; asked explicitly, the keys come back encoded.
    r = FULL.list_objects_v2(Bucket=BUCKET, Prefix=p, EncodingType="url")
    eq(r.get("EncodingType"), "url", "EncodingType=url echoed")
    eq([urllib.parse.unquote(o["Key"]) for o in r["Contents"]], want, "EncodingType=url keys")
    check(p + "%C3%BC%20x" in keys(r), "EncodingType=url encodes")
    raw = client(os.environ["FULL_KEY"], os.environ["FULL_SECRET"])
    raw.meta.events.unregister("before-parameter-build.s3.ListObjectsV2",
                               unique_id=None, handler=set_list_objects_encoding_type_url)
    r = raw.list_objects_v2(Bucket=BUCKET, Prefix=p)
    check("EncodingType" not in r, "no EncodingType unless asked")
    eq(keys(r), want, "keys without EncodingType (raw XML)")
    r = FULL.list_objects_v2(Bucket=BUCKET, Prefix=p + "ü")
    eq(keys(r), [p + "ü x"], "unicode Prefix")
    r = FULL.list_objects_v2(Bucket=BUCKET, Prefix=p, FetchOwner=True, MaxKeys=1)
    check(r["Contents"][0].get("Owner", {}).get("ID"), f"FetchOwner: {r['Contents'][0]}")
    r = FULL.list_objects_v2(Bucket=BUCKET, Prefix=PREFIX + "nothing/")
    eq((r.get("Contents", []), r["KeyCount"]), ([], 0), "empty listing")

    seen, marker, pages = [], "", 0
    while True:
        r = FULL.list_objects(Bucket=BUCKET, Prefix=p, MaxKeys=2, Marker=marker)
        pages += 1
        seen += keys(r)
        if not r["IsTruncated"]:
            break
        marker = r.get("NextMarker") or keys(r)[-1]
        check(pages < 10, "ListObjects v1 Marker pagination ends")
    eq(seen, want, "ListObjects v1 Marker pagination")
    check(all("Owner" in o for o in FULL.list_objects(Bucket=BUCKET, Prefix=p)["Contents"]),
          "ListObjects v1 returns Owner")

    seen, marker = [], ""
    for _ in range(10):
        r = FULL.list_objects(Bucket=BUCKET, Prefix=p, Delimiter="/", MaxKeys=2, Marker=marker)
        seen += keys(r)
        seen += [c["Prefix"] for c in r.get("CommonPrefixes", [])]
        if not r["IsTruncated"]:
            break
        check(r.get("NextMarker"), "ListObjects v1 with Delimiter returns NextMarker")
        marker = r["NextMarker"]
    eq(sorted(seen), shallow, "ListObjects v1 Delimiter pagination")
    eq(len(seen), len(set(seen)), "no duplicates across v1 delimiter pages")


# DeleteObjects: a batch with a missing key, and Quiet mode.
def test_delete_objects():
    k = PREFIX + "batch/"
    for n in "ab":
        put(FULL, k + n, b"x")
    r = FULL.delete_objects(Bucket=BUCKET, Delete={"Objects": [
        {"Key": k + "a"}, {"Key": k + "b"}, {"Key": k + "missing"}]})
    eq(sorted(d["Key"] for d in r.get("Deleted", [])), [k + "a", k + "b", k + "missing"],
       "DeleteObjects Deleted")
    eq(r.get("Errors", []), [], "DeleteObjects Errors")
    eq(FULL.list_objects_v2(Bucket=BUCKET, Prefix=k).get("KeyCount"), 0,
       "DeleteObjects removed the keys")
    put(FULL, k + "c", b"x")
    r = FULL.delete_objects(Bucket=BUCKET, Delete={"Objects": [{"Key": k + "c"}],
                                                   "Quiet": True})
    eq(r.get("Deleted", []), [], "DeleteObjects Quiet returns no Deleted")
    expect_error("NoSuchKey", lambda: get_body(FULL, k + "c"), 404, "Quiet delete happened")


# CopyObject: content + metadata, REPLACE, a specific version, missing
# source, and CopySourceIfMatch.
def test_copy():
    k = PREFIX + "copy/"
    v1 = put(FULL, k + "src", b"one", Metadata={"a": "b"}, ContentType="text/x-src")["VersionId"]
    put(FULL, k + "src", b"two", Metadata={"a": "c"}, ContentType="text/x-src")
    src = {"Bucket": BUCKET, "Key": k + "src"}
    r = FULL.copy_object(Bucket=BUCKET, Key=k + "dst", CopySource=src)
    eq(r["CopyObjectResult"]["ETag"], md5_etag(b"two"), "CopyObject ETag")
    check(r.get("VersionId"), "CopyObject returns the new VersionId")
    g = FULL.get_object(Bucket=BUCKET, Key=k + "dst")
    eq((g["Body"].read(), g["Metadata"], g["ContentType"]), (b"two", {"a": "c"}, "text/x-src"),
       "CopyObject copies content and metadata")
    FULL.copy_object(Bucket=BUCKET, Key=k + "dst2", CopySource=src,
                     MetadataDirective="REPLACE", Metadata={"x": "y"})
    g = FULL.get_object(Bucket=BUCKET, Key=k + "dst2")
    eq((g["Body"].read(), g["Metadata"]), (b"two", {"x": "y"}), "MetadataDirective=REPLACE")
    r = FULL.copy_object(Bucket=BUCKET, Key=k + "dst3", CopySource=dict(src, VersionId=v1))
    eq(r.get("CopySourceVersionId"), v1, "CopySourceVersionId")
    g = FULL.get_object(Bucket=BUCKET, Key=k + "dst3")
    eq((g["Body"].read(), g["Metadata"]), (b"one", {"a": "b"}), "CopyObject of a VersionId")
    expect_error("NoSuchKey", lambda: FULL.copy_object(
        Bucket=BUCKET, Key=k + "dst4", CopySource={"Bucket": BUCKET, "Key": k + "missing"}),
        404, "CopyObject missing source")
    expect_error("PreconditionFailed", lambda: FULL.copy_object(
        Bucket=BUCKET, Key=k + "dst4", CopySource=src, CopySourceIfMatch='"0000"'),
        412, "CopySourceIfMatch wrong")
    FULL.copy_object(Bucket=BUCKET, Key=k + "dst4", CopySource=src,
                     CopySourceIfMatch=md5_etag(b"two"))
    eq(get_body(FULL, k + "dst4"), b"two", "CopySourceIfMatch right")


def complete(c, key, upload_id, parts):
    return c.complete_multipart_upload(
        Bucket=BUCKET, Key=key, UploadId=upload_id,
        MultipartUpload={"Parts": [{"PartNumber": n, "ETag": e} for n, e in parts]})


# Multipart uploads: parts, ListParts, ListMultipartUploads, complete (and
# its refusals), UploadPartCopy, abort, unknown upload ids.
def test_multipart():
    key = PREFIX + "mpu/big"
    up = FULL.create_multipart_upload(Bucket=BUCKET, Key=key, Metadata={"m": "1"})["UploadId"]
    chunks = [os.urandom(5 * MiB), os.urandom(5 * MiB), os.urandom(1 * MiB)]
    etags = []
    for n, data in enumerate(chunks, 1):
        r = FULL.upload_part(Bucket=BUCKET, Key=key, UploadId=up, PartNumber=n, Body=data)
        eq(r["ETag"], md5_etag(data), f"UploadPart {n} ETag")
        etags.append(r["ETag"])
    parts = FULL.list_parts(Bucket=BUCKET, Key=key, UploadId=up)["Parts"]
    eq([(p["PartNumber"], p["ETag"], p["Size"]) for p in parts],
       [(n, e, len(d)) for n, (e, d) in enumerate(zip(etags, chunks), 1)], "ListParts")
    ups = FULL.list_multipart_uploads(Bucket=BUCKET, Prefix=PREFIX + "mpu/").get("Uploads", [])
    eq([(u["Key"], u["UploadId"]) for u in ups], [(key, up)], "ListMultipartUploads")

    expect_error("InvalidPartOrder", lambda: complete(
        FULL, key, up, [(2, etags[1]), (1, etags[0]), (3, etags[2])]), 400,
        "complete with parts out of order")
    expect_error("InvalidPart", lambda: complete(
        FULL, key, up, [(1, etags[0]), (2, '"00000000000000000000000000000000"'), (3, etags[2])]),
        400, "complete with a wrong ETag")
    r = complete(FULL, key, up, list(enumerate(etags, 1)))
    check(r["ETag"].strip('"').endswith("-3"), f"multipart ETag ends with -3: {r['ETag']}")
    md5s = b"".join(hashlib.md5(d).digest() for d in chunks)
    eq(r["ETag"], f'"{hashlib.md5(md5s).hexdigest()}-3"', "multipart ETag = md5(part md5s)-3")
    g = FULL.get_object(Bucket=BUCKET, Key=key)
    check(g["Body"].read() == b"".join(chunks), "multipart object is the parts' concatenation")
    eq(g["Metadata"], {"m": "1"}, "multipart metadata")
    eq(g["ETag"], r["ETag"], "GetObject ETag of the multipart object")
    eq(FULL.list_multipart_uploads(Bucket=BUCKET, Prefix=PREFIX + "mpu/").get("Uploads", []),
       [], "completed upload leaves ListMultipartUploads")

    small = PREFIX + "mpu/small"
    up = FULL.create_multipart_upload(Bucket=BUCKET, Key=small)["UploadId"]
    e1 = FULL.upload_part(Bucket=BUCKET, Key=small, UploadId=up, PartNumber=1,
                          Body=os.urandom(MiB))["ETag"]
    e2 = FULL.upload_part(Bucket=BUCKET, Key=small, UploadId=up, PartNumber=2,
                          Body=b"tail")["ETag"]
    expect_error("EntityTooSmall", lambda: complete(FULL, small, up, [(1, e1), (2, e2)]), 400,
                 "complete with a first part under 5 MiB")
    FULL.abort_multipart_upload(Bucket=BUCKET, Key=small, UploadId=up)
    expect_error("NoSuchUpload", lambda: FULL.list_parts(Bucket=BUCKET, Key=small, UploadId=up),
                 404, "ListParts after AbortMultipartUpload")
    expect_error("NoSuchUpload", lambda: FULL.upload_part(
        Bucket=BUCKET, Key=small, UploadId="bogus-upload-id", PartNumber=1, Body=b"x"), 404,
        "UploadPart to a bogus upload id")

    whole = b"".join(chunks)
    copy = PREFIX + "mpu/copy"
    up = FULL.create_multipart_upload(Bucket=BUCKET, Key=copy)["UploadId"]
    r = FULL.upload_part_copy(Bucket=BUCKET, Key=copy, UploadId=up, PartNumber=1,
                              CopySource={"Bucket": BUCKET, "Key": key},
                              CopySourceRange=f"bytes=1000-{1000 + 5 * MiB - 1}")
    c1 = r["CopyPartResult"]["ETag"]
    eq(c1, md5_etag(whole[1000:1000 + 5 * MiB]), "UploadPartCopy ETag")
    c2 = FULL.upload_part(Bucket=BUCKET, Key=copy, UploadId=up, PartNumber=2,
                          Body=b"end")["ETag"]
    complete(FULL, copy, up, [(1, c1), (2, c2)])
    check(get_body(FULL, copy) == whole[1000:1000 + 5 * MiB] + b"end",
          "UploadPartCopy with CopySourceRange builds the part")


# Signatures and tenancy: bad secret, unknown key, another tenant's
# credential, presigned URLs (and a tampered one).
def test_auth():
    key = PREFIX + "auth"
    put(FULL, key, b"secret stuff")
    secret = os.environ["FULL_SECRET"]
    # Flip the last character to one it certainly is not.
    bad = client(os.environ["FULL_KEY"], secret[:-1] + ("y" if secret.endswith("x") else "x"))
    expect_error("SignatureDoesNotMatch", lambda: get_body(bad, key), 403, "wrong secret")
    unknown = client("LBNOSUCHKEY000000000", "x" * 40)
    expect_error("InvalidAccessKeyId", lambda: get_body(unknown, key), 403, "unknown access key")
    expect_error("AccessDenied", lambda: get_body(OTHER, key), 403, "other tenant GetObject")
    expect_error("AccessDenied", lambda: put(OTHER, PREFIX + "intruder", b"x"), 403,
                 "other tenant PutObject")
    expect_error("AccessDenied", lambda: OTHER.list_objects_v2(Bucket=BUCKET), 403,
                 "other tenant ListObjectsV2")
    expect_error("NoSuchKey", lambda: get_body(FULL, PREFIX + "intruder"), 404,
                 "other tenant's PUT left nothing")

    url = FULL.generate_presigned_url("get_object", Params={"Bucket": BUCKET, "Key": key},
                                      ExpiresIn=300)
    with urllib.request.urlopen(url, timeout=30) as resp:
        eq((resp.status, resp.read()), (200, b"secret stuff"), "presigned GET")
    parts = urllib.parse.urlsplit(url)
    q = urllib.parse.parse_qsl(parts.query)
    q = [(n, (v[:-1] + ("0" if v[-1] != "0" else "1")) if n == "X-Amz-Signature" else v)
         for n, v in q]
    tampered = urllib.parse.urlunsplit(parts._replace(query=urllib.parse.urlencode(q)))
    check(tampered != url, "tampered URL differs")
    try:
        urllib.request.urlopen(tampered, timeout=30)
        raise CheckFailed("tampered presigned GET succeeded")
    except urllib.error.HTTPError as e:
        eq(e.code, 403, "tampered presigned GET status")
        check(b"<Code>SignatureDoesNotMatch</Code>" in e.read(), "tampered presigned GET code")


# Virtual-host-style addressing: BUCKET.localhost:PORT (presigned GET).
def test_virtual_host():
    key = PREFIX + "vhost/ü obj"
    put(FULL, key, b"virtual")
    port = urllib.parse.urlsplit(ENDPOINT).port
    vh = client(os.environ["FULL_KEY"], os.environ["FULL_SECRET"],
                endpoint=f"http://localhost:{port}", style="virtual")
    url = vh.generate_presigned_url("get_object", Params={"Bucket": BUCKET, "Key": key},
                                    ExpiresIn=300)
    parts = urllib.parse.urlsplit(url)
    eq(parts.netloc, f"{BUCKET}.localhost:{port}", "virtual-host presigned URL host")
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        conn.request("GET", parts.path + "?" + parts.query, headers={"Host": parts.netloc})
        resp = conn.getresponse()
        body = resp.read()
        eq((resp.status, body), (200, b"virtual"), "virtual-host presigned GET")
    finally:
        conn.close()


# Credential modes: read-only (reads only) and append-only (create
# anywhere; overwrite and delete only under locks/).
def test_credential_modes():
    key = PREFIX + "modes/existing"
    put(FULL, key, b"original")
    eq(get_body(RO, key), b"original", "read-only GetObject")
    eq(RO.list_objects_v2(Bucket=BUCKET, Prefix=PREFIX + "modes/")["KeyCount"], 1,
       "read-only ListObjectsV2")
    expect_error("AccessDenied", lambda: put(RO, PREFIX + "modes/ro", b"x"), 403,
                 "read-only PutObject")
    expect_error("AccessDenied", lambda: RO.delete_object(Bucket=BUCKET, Key=key), 403,
                 "read-only DeleteObject")
    expect_error("AccessDenied", lambda: RO.create_bucket(Bucket=RUN + "-ro"), 403,
                 "read-only CreateBucket")
    eq(get_body(FULL, key), b"original", "read-only changed nothing")

    put(AO, PREFIX + "modes/new", b"appended")
    eq(get_body(AO, PREFIX + "modes/new"), b"appended", "append-only PutObject of a new key")
    expect_error("AccessDenied", lambda: put(AO, key, b"overwrite"), 403,
                 "append-only overwrite outside locks/")
    expect_error("AccessDenied", lambda: AO.delete_object(Bucket=BUCKET, Key=key), 403,
                 "append-only DeleteObject outside locks/")
    eq(get_body(FULL, key), b"original", "append-only changed nothing outside locks/")
    lock = LOCKS + "lock-1"
    put(AO, lock, b"v1")
    put(AO, lock, b"v2")
    eq(get_body(AO, lock), b"v2", "append-only overwrite under locks/")
    AO.delete_object(Bucket=BUCKET, Key=lock)
    expect_error("NoSuchKey", lambda: get_body(AO, lock), 404,
                 "append-only DeleteObject under locks/")

    up = AO.create_multipart_upload(Bucket=BUCKET, Key=key)["UploadId"]
    e = AO.upload_part(Bucket=BUCKET, Key=key, UploadId=up, PartNumber=1, Body=b"mp")["ETag"]
    expect_error("AccessDenied", lambda: complete(AO, key, up, [(1, e)]), 403,
                 "append-only multipart complete onto an existing key")
    eq(get_body(FULL, key), b"original", "refused multipart complete changed nothing")
    FULL.abort_multipart_upload(Bucket=BUCKET, Key=key, UploadId=up)
    fresh = PREFIX + "modes/mp-new"
    up = AO.create_multipart_upload(Bucket=BUCKET, Key=fresh)["UploadId"]
    e = AO.upload_part(Bucket=BUCKET, Key=fresh, UploadId=up, PartNumber=1, Body=b"mp")["ETag"]
    complete(AO, fresh, up, [(1, e)])
    eq(get_body(AO, fresh), b"mp", "append-only multipart onto a new key")


def raw_signed(method, path, body=b"", headers=None):
    """Sends a SigV4-signed request botocore would never build (bad XML),
    returns (status, body)."""
    from botocore.auth import S3SigV4Auth
    from botocore.awsrequest import AWSRequest
    from botocore.credentials import Credentials
    headers = dict(headers or {})
    headers["x-amz-content-sha256"] = hashlib.sha256(body).hexdigest()
    req = AWSRequest(method=method, url=ENDPOINT + path, data=body, headers=headers)
    S3SigV4Auth(Credentials(os.environ["FULL_KEY"], os.environ["FULL_SECRET"]),
                "s3", "us-east-1").add_auth(req)
    prepared = req.prepare()
    netloc = urllib.parse.urlsplit(ENDPOINT).netloc
    conn = http.client.HTTPConnection(netloc, timeout=30)
    conn.request(method, path, body=body, headers=dict(prepared.headers))
    resp = conn.getresponse()
    out = (resp.status, resp.read())
    conn.close()
    return out


# Bad input the SDK would not send: malformed XML bodies, an expired
# presigned URL.
def test_bad_input():
    garbage = b"<Delete><Object><Key>unterminated"
    status, body = raw_signed(
        "POST", f"/{BUCKET}?delete", garbage,
        {"Content-MD5": base64.b64encode(hashlib.md5(garbage).digest()).decode()})
    eq(status, 400, "DeleteObjects with malformed XML: status")
    check(b"<Code>MalformedXML</Code>" in body, f"DeleteObjects malformed XML code: {body!r}")
    key = PREFIX + "bad-input/mp"
    up = FULL.create_multipart_upload(Bucket=BUCKET, Key=key)["UploadId"]
    q = urllib.parse.quote(key)
    status, body = raw_signed("POST", f"/{BUCKET}/{q}?uploadId={up}", b"<CompleteMultipartUpload><Part>")
    eq(status, 400, "CompleteMultipartUpload with malformed XML: status")
    check(b"<Code>MalformedXML</Code>" in body, f"complete malformed XML code: {body!r}")
    FULL.abort_multipart_upload(Bucket=BUCKET, Key=key, UploadId=up)

    put(FULL, PREFIX + "bad-input/obj", b"short-lived link")
    url = FULL.generate_presigned_url("get_object", ExpiresIn=1,
                                      Params={"Bucket": BUCKET, "Key": PREFIX + "bad-input/obj"})
    import time
    time.sleep(2.2)
    try:
        urllib.request.urlopen(url, timeout=30)
        raise CheckFailed("an expired presigned GET succeeded")
    except urllib.error.HTTPError as e:
        eq(e.code, 403, "expired presigned GET status")
        check(b"<Code>AccessDenied</Code>" in e.read(), "expired presigned GET code")


def cleanup():
    """Removes what this run wrote (every version, and unfinished uploads)."""
    for prefix in (PREFIX, LOCKS):
        for u in FULL.list_multipart_uploads(Bucket=BUCKET, Prefix=prefix).get("Uploads", []):
            FULL.abort_multipart_upload(Bucket=BUCKET, Key=u["Key"], UploadId=u["UploadId"])
        purge(FULL, BUCKET, prefix)
    eq(all_versions(PREFIX), ([], []), "cleanup removed every version")


def main():
    print(f"S3 SDK checks against {ENDPOINT}, bucket {BUCKET}, prefix {PREFIX}")
    groups = [test_buckets, test_objects, test_ranges_and_conditions, test_versions,
              test_listing, test_delete_objects, test_copy, test_multipart, test_auth,
              test_virtual_host, test_credential_modes, test_bad_input, cleanup]
    failed = []
    for group in groups:
        try:
            group()
            print(f"ok   {group.__name__}", flush=True)
        except CheckFailed as e:
            failed.append(f"{group.__name__}: {e}")
            print(f"FAIL {group.__name__}: {e}", flush=True)
        except Exception as e:  # an unexpected error is a failure too
            failed.append(f"{group.__name__}: unexpected {type(e).__name__}: {e}")
            print(f"FAIL {group.__name__}: unexpected error", flush=True)
            traceback.print_exc(file=sys.stdout)
            sys.stdout.flush()
    failed += [f"connection reuse: {d}" for d in DEFERRED]
    if failed:
        print(f"\n{len(failed)} S3 SDK check(s) failed:", file=sys.stderr)
        for f in failed:
            print(f"  - {f}", file=sys.stderr)
        sys.exit(1)
    print("all S3 checks passed")


if __name__ == "__main__":
    main()
