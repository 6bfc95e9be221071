"""What a scan costs: the tiered price, `celebscan estimate`, `--max-cost`, `--prefilter-faces`."""

import pytest
from sqlalchemy import select

from producer.cost import PriceList
from producer.demo import build_demo_set
from tests.clirun import celebscan
from tests.imagemaker import jpeg
from tests.rekognition_standin import celebrity
from worker.errors import ConfigurationError
from worker.schema import images
from worker.settings import DEFAULT_REKOGNITION_PRICES
from worker.store import ResultStore

MB = 1024 * 1024


def test_the_default_price_list_is_tiered():
    prices = PriceList.parse(DEFAULT_REKOGNITION_PRICES)
    assert prices.cost(1000) == pytest.approx(1.0)
    assert prices.cost(2_000_000) == pytest.approx(1000 + 800)
    assert prices.cost(10, already_billed=999_995) == pytest.approx(5 * 0.001 + 5 * 0.0008)
    assert prices.cost(1, already_billed=40_000_000) == pytest.approx(0.00025)
    assert prices.images_within(1200) == 1_250_000
    assert prices.images_within(0.0009) == 0


@pytest.mark.parametrize("text", ["", "abc", "0.001,0.0008", "-1", "0.001:0,0.1"])
def test_a_bad_price_list_is_refused(text):
    with pytest.raises(ConfigurationError):
        PriceList.parse(text)


def invoke(env, *args) -> str:
    return celebscan(*args, env=env).output


@pytest.fixture
def env(aws_env, rekognition, sqlite_url):
    rekognition.answer = lambda key, data: {"CelebrityFaces": [celebrity("someone")]}
    return {
        **aws_env,
        "AWS_ENDPOINT_URL_REKOGNITION": rekognition.url,
        "CELEBSCAN_DATABASE_URL": sqlite_url,
        "CELEBSCAN_WORKERS": "1",
    }


def test_estimate_counts_sizes_skips_and_cost_without_calling(env, rekognition, s3, bucket):
    for number in range(4):
        s3.put_object(Bucket=bucket, Key=f"p/small/{number}.jpg", Body=jpeg(200 + number, 160))
    s3.put_object(Bucket=bucket, Key="p/big.jpg", Body=b"\xff\xd8\xff" + bytes(16 * MB))
    s3.put_object(Bucket=bucket, Key="p/huge.jpg", Body=b"\xff\xd8\xff" + bytes(21 * MB))
    env = {**env, "CELEBSCAN_MAX_IMAGE_BYTES": str(20 * MB)}
    invoke(env, "scan", f"s3://{bucket}/p/small/", "--backend", "rekognition")
    calls = len(rekognition.calls)

    output = invoke(env, "estimate", f"s3://{bucket}/p/")
    assert f"s3://{bucket}/p/: 6 images, 38.8 MB" in output
    assert "already done with rekognition (skipped): 4" in output
    assert "to scan: 2; over the service's limits: 1 to be converted" in output and "1 to be refused" in output
    assert "estimated Rekognition cost: $0.0010 for 1 calls" in output
    assert len(rekognition.calls) == calls, "estimate never calls the service"
    env = {**env, "CELEBSCAN_REKOGNITION_PRICES": "2.5"}
    assert "estimated Rekognition cost: $2.50 for 1 calls" in invoke(env, "estimate", f"s3://{bucket}/p/")


def test_max_cost_sends_what_the_budget_pays_for_and_resume_continues(env, rekognition, s3, bucket, sqlite_url):
    for number in range(10):
        s3.put_object(Bucket=bucket, Key=f"b/{number}.jpg", Body=jpeg(200 + number, 160))
    env = {**env, "CELEBSCAN_REKOGNITION_PRICES": "0.25"}
    output = invoke(env, "scan", f"s3://{bucket}/b/", "--backend", "rekognition", "--max-cost", "1")
    assert "budget $1.00 pays for 4 images (at most $1.00)" in output
    assert "budget $1.00 covers 4 of 10 images; 6 left out, still queued" in output
    assert len(rekognition.calls) == 4
    assert "4 done, 0 failed" in output and "6 queued" in output
    assert "paid calls: 4 (estimated $1.00)" in output

    scan_id = ResultStore.connect(sqlite_url).latest_scan_id()
    output = invoke(env, "scan", "--resume", str(scan_id), "--max-cost", "100")
    assert len(rekognition.calls) == 10 and "10 done" in output and "paid calls: 10 (estimated $2.50)" in output


@pytest.mark.slow
def test_prefilter_sends_only_images_with_a_face(env, rekognition, sqlite_url, tmp_path):
    sample = build_demo_set(tmp_path)
    env = {**env, "CELEBSCAN_REKOGNITION_PRICES": "0.5"}
    output = invoke(env, "scan", str(sample.images), "--backend", "rekognition", "--prefilter-faces")
    with_faces = {name for name, people in sample.expected.items() if people}
    assert len(rekognition.calls) == len(with_faces) == 6
    assert "paid calls: 6 (estimated $3.00); the face prefilter saved 3 calls ($1.50)" in output
    store = ResultStore.connect(sqlite_url)
    with store.engine.connect() as conn:
        saved = {row.key for row in conn.execute(select(images.c.key).where(images.c.calls_saved == 1))}
    assert saved == {"coffee.jpg", "cat.jpg", "gradient.png"}
    records = {r.key: r for r in store.result_records()}
    assert all(records[key].status == "done" and not records[key].celebrities for key in saved)
    assert records["broken.jpg"].error.code == "CorruptImage"


def test_prefilter_is_for_the_paid_backend_only(env, tmp_path):
    result = celebscan("scan", tmp_path, "--backend", "local", "--prefilter-faces", env=env, ok=False)
    assert result.exit_code == 2 and "--backend rekognition" in result.output
