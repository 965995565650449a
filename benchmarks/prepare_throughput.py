"""How fast does `prepare` turn a 100,000-row dataset into tensors? Text and images, on this machine.

Builds the datasets by repeating the shared real data (../shared/data by default) to 100,000 rows,
writes them as Parquet to a temporary folder, and times `tasks.prepare.prepare` without the
prepared-data cache (loading, tensorising, deduplicating, splitting, normalising), then once more
with it (the rerun case). Run from the project folder:

    .venv/bin/python benchmarks/prepare_throughput.py [--shared ../shared/data] [--rows 100000]
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pandas as pd  # noqa: E402

from adaptflow.spec import DataSpec  # noqa: E402
from tasks.prepare import prepare  # noqa: E402

CASES = {
    # name: (shared folder, spec settings, source domains, target domains)
    "text": ("amazon_mds", {"input": "text"}, ["books", "dvd"], ["electronics", "kitchen"]),
    "image": (
        "digits",
        {"input": "pixels", "modality": "image", "image_size": 28, "channels": 1},
        ["mnist", "usps"],
        ["optdigits"],
    ),
}


def repeated(shared: Path, rows: int, folder: Path) -> Path:
    """The shared Parquet files concatenated and repeated to `rows` rows; texts get a copy number so
    that they stay distinct (repeated images are deduplicated after conversion, which still runs)."""
    frame = pd.concat([pd.read_parquet(path) for path in sorted(shared.glob("*.parquet"))], ignore_index=True)
    frame = frame.iloc[[i % len(frame) for i in range(rows)]].reset_index(drop=True)
    if "text" in frame:
        frame["text"] = frame["text"] + " copy" + (frame.index // (rows // 12 + 1)).astype(str)
    path = folder / "data.parquet"
    frame.to_parquet(path, index=False)
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shared", type=Path, default=Path("../shared/data"))
    parser.add_argument("--rows", type=int, default=100_000)
    args = parser.parse_args()
    print(f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f}")
    for name, (folder, settings, source, target) in CASES.items():
        with tempfile.TemporaryDirectory() as scratch:
            path = repeated(args.shared / folder, args.rows, Path(scratch))
            spec = DataSpec(path="parquet", data_files=str(path), **settings)
            started = time.perf_counter()
            prepared = prepare(spec, source, target, cache=None)
            seconds = time.perf_counter() - started
            cache = Path(scratch) / "cache"
            prepare(spec, source, target, cache=cache)
            started = time.perf_counter()
            prepare(spec, source, target, cache=cache)
            cached = time.perf_counter() - started
        kept = sum(prepared.rows_per_domain.values())
        print(
            f"{name}: {args.rows:,} rows in {seconds:.1f} s ({args.rows / seconds:,.0f} rows/s), "
            f"input shape {prepared.input_shape}, {kept:,} distinct rows kept; from the cache: {cached:.2f} s"
        )


if __name__ == "__main__":
    main()
