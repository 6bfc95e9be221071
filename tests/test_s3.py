"""S3 listing and reading against moto's server over HTTP."""

import pytest

from tests.imagemaker import jpeg
from worker.aws import client
from worker.errors import ConfigurationError, ObjectMissingError
from worker.listing import check_bucket, list_s3
from worker.settings import Settings
from worker.sources import S3Reader


@pytest.fixture
def filled(s3, bucket):
    keys = [
        "2024/a.jpg",
        "2024/b.PNG",
        "2024/notes.txt",
        "2024/sub/c.jpeg",
        "2024/sub/deeper/d.jpg",
        "2024/other/e.webp",
        "2024/ünïcode dir/f g+h%20.jpg",
        "2023/old.jpg",
        "2024/folder-marker/",
    ]
    for key in keys:
        s3.put_object(Bucket=bucket, Key=key, Body=b"" if key.endswith("/") else jpeg())
    return bucket


def test_lists_image_objects_under_the_prefix_in_parallel(filled):
    s3 = client("s3", Settings())
    listed = {o.key: o for o in list_s3(s3, filled, "2024/", threads=3)}
    assert set(listed) == {
        "2024/a.jpg",
        "2024/b.PNG",
        "2024/sub/c.jpeg",
        "2024/sub/deeper/d.jpg",
        "2024/other/e.webp",
        "2024/ünïcode dir/f g+h%20.jpg",
    }
    size = len(jpeg())
    assert all(o.size == size and len(o.etag) == 32 and '"' not in o.etag for o in listed.values())


def test_listing_pages_through_many_objects(s3, bucket):
    keys = [f"p/{i % 3}/img{i:04d}.jpg" for i in range(40)] + [f"p/top{i}.jpg" for i in range(9)]
    for key in keys:
        s3.put_object(Bucket=bucket, Key=key, Body=b"x")
    listed = [o.key for o in list_s3(client("s3", Settings()), bucket, "p/", page_size=4)]
    assert sorted(listed) == sorted(keys)


def test_endpoint_url_setting_overrides_the_environment(filled, moto_url, monkeypatch):
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", "http://127.0.0.1:1")
    s3 = client("s3", Settings(endpoint_url=moto_url))
    assert len(list(list_s3(s3, filled, "2023/"))) == 1


def test_missing_bucket_is_a_configuration_error(aws_env):
    with pytest.raises(ConfigurationError, match="NoSuchBucket|does not exist"):
        check_bucket(client("s3", Settings()), "no-such-bucket-here")


def test_unreachable_endpoint_is_a_configuration_error(aws_env):
    s3 = client("s3", Settings(endpoint_url="http://127.0.0.1:1"))
    with pytest.raises(ConfigurationError, match="127.0.0.1:1"):
        check_bucket(s3, "anything")


def test_reader_reads_and_types_its_errors(filled):
    reader = S3Reader(client("s3", Settings()), max_bytes=10**6)
    assert reader.read(filled, "2024/ünïcode dir/f g+h%20.jpg") == jpeg()
    with pytest.raises(ObjectMissingError) as missing:
        reader.read(filled, "2024/gone.jpg")
    assert missing.value.code == "ObjectNotFound"
    small = S3Reader(client("s3", Settings()), max_bytes=100)
    with pytest.raises(Exception) as too_big:
        small.read(filled, "2024/a.jpg")
    assert too_big.value.code == "ImageTooLarge"


def test_a_listing_that_fails_part_way_keeps_what_it_listed_and_says_so(
    s3, bucket, aws_env, rekognition, sqlite_url, monkeypatch
):
    """Page 3 of the listing is refused (access denied): the images of the pages before it are
    recorded and scanned, the scan says the listing failed and why, and the command exits 1."""
    from botocore.exceptions import ClientError

    import producer.scan
    from tests.clirun import celebscan
    from worker.listing_parts import s3_pages
    from worker.store import ResultStore

    for i in range(30):
        s3.put_object(Bucket=bucket, Key=f"img{i:03d}.jpg", Body=jpeg())

    class RefusedAtPageThree:
        def __init__(self, client):
            self.client, self.pages = client, 0

        def list_objects_v2(self, **arguments):
            self.pages += 1
            if self.pages == 3:
                raise ClientError({"Error": {"Code": "AccessDenied", "Message": "Access Denied"}}, "ListObjectsV2")
            return self.client.list_objects_v2(**arguments)

    def pages_of_ten(client, **options):
        return s3_pages(RefusedAtPageThree(client), attempts=options.get("attempts", 5), page_size=10)

    monkeypatch.setattr(producer.scan, "s3_pages", pages_of_ten)
    failed = celebscan("--database-url", sqlite_url, "scan", f"s3://{bucket}/", "--backend", "rekognition", ok=False)
    assert failed.exit_code == 1 and "Traceback" not in failed.output
    started, message = failed.output.strip().splitlines()  # the scan's line, then one line of error
    assert started.startswith("scan 1: s3://")
    assert "AccessDenied" in message and "recorded the 20 images listed before that" in message
    assert "celebscan scan --resume 1" in message

    store = ResultStore.connect(sqlite_url)
    summary = store.summary(1)
    assert (summary.listing, summary.listed, summary.counts["done"]) == ("listing failed", 20, 20)
    assert summary.finished_at is not None, "what was listed is done: the scan ends, marked by its failed listing"
    status = celebscan("--database-url", sqlite_url, "status", "1").output
    assert "20 listed so far" in status and "listing failed: " in status
    store.engine.dispose()


@pytest.mark.parametrize("prefixes", [0, 7], ids=["flat", "folders"])
def test_the_key_space_splits_into_parts_that_list_every_key_once(prefixes):
    """A flat bucket of numbered names splits as well as one with folders: the parts are disjoint,
    cover every key, list to the same keys as one plain listing, and finding them costs about as
    many requests for ten times the keys; a part that one page lists is not split further."""
    import boto3

    from tests.synthetic_s3 import SyntheticBucket, serving
    from worker.listing import split_key_space

    probes = {}
    for count in (50_000, 500_000):
        bucket = SyntheticBucket("split", count, prefixes=prefixes)
        with serving([bucket]) as (url, stats):
            s3 = boto3.client(
                "s3", endpoint_url=url, region_name="us-east-1", aws_access_key_id="x", aws_secret_access_key="y"
            )
            exact, parts = split_key_space(s3, "split", "", parts=32)
            probes[count] = stats["list_requests"]
            keys = [bucket.key(i) for i in range(bucket.count)]
            owners = {part: 0 for part in parts}
            for key in keys:
                [owner] = [part for part in parts if key.startswith(part)]
                owners[owner] += 1
            assert exact == [] and 32 <= len(parts) <= 120 and all(owners.values()), parts
            if count == 50_000:
                listed = [o.key for o in list_s3(s3, "split", "", threads=4, page_size=300)]
                assert sorted(listed) == keys
    print(f"\nrequests to split: {probes}")
    with serving([SyntheticBucket("small", 1000, prefixes=prefixes)]) as (url, stats):
        s3 = boto3.client(
            "s3", endpoint_url=url, region_name="us-east-1", aws_access_key_id="x", aws_secret_access_key="y"
        )
        assert split_key_space(s3, "small", "", parts=32) == ([], [""]), "a page lists it: not split"
        assert stats["list_requests"] == 1
    assert probes[500_000] <= 1.5 * probes[50_000]
    with serving([SyntheticBucket("few", 5_000, prefixes=prefixes)]) as (url, _):
        s3 = boto3.client(
            "s3", endpoint_url=url, region_name="us-east-1", aws_access_key_id="x", aws_secret_access_key="y"
        )
        _, parts = split_key_space(s3, "few", "", parts=32)
        sizes = [
            sum(1 for i in range(5_000) if SyntheticBucket("few", 5_000, prefixes).key(i).startswith(p)) for p in parts
        ]
        assert sum(sizes) == 5_000 and max(sizes) <= 1000 and len(parts) < 32, "split only down to a page a part"


def test_an_object_named_like_a_split_prefix_is_listed_too(s3, bucket):
    for key in ("a", "a.jpg", "ab.jpg", "b.png", "c/d.jpg"):
        s3.put_object(Bucket=bucket, Key=key, Body=jpeg())
    s3.put_object(Bucket=bucket, Key="a", Body=b"no image name")
    s3.put_object(Bucket=bucket, Key="img", Body=jpeg())
    s3.put_object(Bucket=bucket, Key="img.jpg", Body=jpeg())
    listed = sorted(o.key for o in list_s3(client("s3", Settings()), bucket, "", parts=64, page_size=2))
    assert listed == ["a.jpg", "ab.jpg", "b.png", "c/d.jpg", "img.jpg"]
