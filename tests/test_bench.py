"""make bench, shrunk: every figure docs/speed.md quotes comes out, and the table names them."""

from onecycle.commands import bench


def test_bench_measures_both_loops_and_both_backends():
    r = bench.run(
        width=4, batch=32, steps=2, repeats=2, backend="torch", device="cpu", compile_="auto"
    )
    for key in ("bare_img_per_s", "pipeline_img_per_s", "ratio"):
        assert r[key] > 0
    pairs = sorted(p / b for p, b in zip(r["pipeline_runs"], r["bare_runs"], strict=True))
    assert r["ratio"] == sum(pairs) / 2  # the median of the repeats' pipeline/bare pairs
    assert set(r["augment_img_per_s"]) == {"albumentations", "torch"} and r["compile"] is False
    assert r["device"] == "cpu" and r["backend"] == "torch" and len(r["bare_runs"]) == 2
    text = bench.table(r)
    assert "bare loop" in text and "ratio pipeline / bare" in text and "albumentations" in text
