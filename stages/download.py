"""download: fetch data.source, check it, and write data/prepared (uint8 images, labels, stats)."""

from onecycle import files, paths
from onecycle.config import load_params
from onecycle.data import prepared, sources, splits
from onecycle.params_file import repo_root
from onecycle.pipeline import runner


def main() -> None:
    params = load_params()
    cfg = params.data
    root = repo_root()
    ds, source = sources.fetch(cfg, root, root / paths.RAW_DIR, params.split_seed)
    ds, val = splits.carve_validation(ds, cfg.val_images, params.split_seed)
    meta = prepared.save_prepared(ds, paths.PREPARED_DIR, source, val).meta
    counts = {k: meta.get(k, 0) for k in ("num_train", "num_val", "num_test")}
    files.write_json(paths.DATA_METRICS, counts | {"num_classes": len(ds.classes)})
    val_part = f" + {meta['num_val']:,} validation" if val is not None else ""
    print(
        f"prepared {meta['num_train']:,} train{val_part} + {meta['num_test']:,} test images, "
        f"{len(ds.classes)} classes, from {meta['source']} -> {paths.PREPARED_DIR}"
    )


if __name__ == "__main__":
    runner.run(main, "download")
