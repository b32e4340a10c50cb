"""download: fetch data.source, check it, and write data/prepared (uint8 images, labels, stats)."""

from onecycle import cli, data, paths
from onecycle.config import load_params, repo_root


def main() -> None:
    params = load_params()
    cfg = params.data
    root = repo_root()
    ds, source = data.fetch(cfg.source, root, root / paths.RAW_DIR, cfg.image_size, cfg.timeout)
    ds = data.subset(ds, cfg.train_subset, cfg.test_subset, params.base.seed)
    prepared = data.save_prepared(ds, paths.PREPARED_DIR, source)
    meta = prepared.meta
    cli.write_json(
        paths.DATA_METRICS,
        {
            "num_train": meta["num_train"],
            "num_test": meta["num_test"],
            "num_classes": len(meta["classes"]),
        },
    )
    print(
        f"prepared {meta['num_train']:,} train + {meta['num_test']:,} test images, "
        f"{len(meta['classes'])} classes, from {source} -> {paths.PREPARED_DIR}"
    )


if __name__ == "__main__":
    cli.run(main, "download")
