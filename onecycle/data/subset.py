"""Some classes of an image-folder dataset, as an image-folder dataset of their own: the transfer
example's source (CIFAR-10's six animals) and target (its four vehicles) from one archive.

    python -m onecycle.data.subset ../shared/datasets/cifar10-jpg.tar.gz data/transfer/animals \\
        --classes bird,cat,deer,dog,frog,horse

Reads a .tar/.tar.gz/.tgz or a directory laid out ``[prefix/]{train,test}/<class>/*`` and writes
``OUT/{train,test}/<class>/*`` (the files as they are). The folder appears whole or not at all;
an existing one made from the same source and classes is kept.
"""

from __future__ import annotations

import argparse
import json
import shutil
import tarfile
from pathlib import Path, PurePosixPath

from onecycle.data.archives import tar_members
from onecycle.data.imagefolder import SPLITS, Layout
from onecycle.errors import UserError

MARKER = "subset.json"  # what the folder was made from


class SubsetError(UserError):
    """The source or the classes asked for cannot make the subset."""


def _members(source: Path):
    """(split, class, file name, bytes) of every image file of ``source``, found as the download
    stage finds them (:class:`imagefolder.Layout`; a tar's members through its safety checks)."""
    layout = Layout(str(source))
    if source.is_dir():
        for path in sorted(source.rglob("*")):
            found = layout.place(path.relative_to(source).as_posix(), is_dir=False)
            if found and path.is_file() and not path.is_symlink():
                yield *found, path.name, path.read_bytes()
        return
    try:
        with tarfile.open(source) as tar:
            for member in tar_members(tar, source):
                found = layout.place(member.name, is_dir=False)
                if found and member.isfile():
                    yield *found, PurePosixPath(member.name).name, tar.extractfile(member).read()
    except (tarfile.TarError, OSError) as exc:
        raise SubsetError(f"{source}: not a readable .tar/.tar.gz or directory ({exc})") from None


def make(source: Path, out: Path, classes: list[str]) -> dict[str, dict[str, int]]:
    """Write the subset; returns the image count per split and class."""
    wanted = {"source": str(source.resolve()), "classes": sorted(classes)}
    marker = out / MARKER
    if marker.exists() and json.loads(marker.read_text()).get("made_from") == wanted:
        return json.loads(marker.read_text())["counts"]
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    counts: dict[str, dict[str, int]] = {s: {c: 0 for c in sorted(classes)} for s in SPLITS}
    seen: set[str] = set()
    for split, cls, name, data in _members(source):
        seen.add(cls)
        if cls in counts[split]:
            dest = tmp / split / cls / name
            dest.parent.mkdir(parents=True, exist_ok=True)
            dest.write_bytes(data)
            counts[split][cls] += 1
    empty = [f"{s}/{c}" for s in SPLITS for c, n in counts[s].items() if n == 0]
    if empty:
        shutil.rmtree(tmp, ignore_errors=True)
        raise SubsetError(
            f"{source}: no images for {', '.join(empty)}; its classes are {sorted(seen)}"
        )
    (tmp / MARKER).write_text(json.dumps({"made_from": wanted, "counts": counts}, indent=2))
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    return counts


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(
        prog="python -m onecycle.data.subset", description=__doc__.split("\n")[0]
    )
    ap.add_argument("source", type=Path, help="image-folder .tar/.tar.gz or directory")
    ap.add_argument("out", type=Path, help="the folder to write")
    ap.add_argument("--classes", required=True, help="comma-separated class names")
    args = ap.parse_args(argv)
    classes = [c for c in args.classes.split(",") if c]
    counts = make(args.source, args.out, classes)
    sizes = ", ".join(f"{s} {sum(counts[s].values()):,}" for s in SPLITS)
    print(f"{args.out}: {len(classes)} classes ({', '.join(sorted(classes))}); {sizes} images")


if __name__ == "__main__":
    from onecycle.pipeline import runner

    runner.run(main, "subset")
