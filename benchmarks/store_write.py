"""What keeping generated samples costs a producer: the sample store's write time per sample.

With ``cache_dir=``, each producer appends every row it generates to tar shards (:class:`onlineaug.store.ShardWriter`:
one ``.npy`` per payload field and a ``.json`` per sample, a shard sealed with ``fsync`` and an atomic rename when
full). This times exactly that call on the recipe's real payload (``recipe.pool_fields(size)``: GenMix holds the
original and the edit, uint8 (3, S, S) each, and three int64 scalars) filled with random bytes, appended in batches
of ``--rows-per-append`` (a producer's generator batch) into a fresh store folder under ``--dir``. Runs of the image
sizes are interleaved (size A, B, A, B, ...); per size the median over the runs of the seconds per sample, every
shard's seal included, and the bytes written per sample.

    python benchmarks/store_write.py                     # CPU: 64, 224 and 512 px, 256 samples per run
    python benchmarks/store_write.py --quick             # the smoke settings of the tests
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make `benchmarks` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np

from benchmarks import common
from onlineaug.recipes import get_recipe
from onlineaug.store import DEFAULT_SHARD_SIZE, ShardWriter
from onlineaug.tables import text_table


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--recipe", default="genmix", help="the recipe whose payload is written")
    parser.add_argument("--sizes", type=int, nargs="+", default=[64, 224, 512], help="image sizes (px)")
    parser.add_argument("--samples", type=int, default=256, help="samples written per run")
    parser.add_argument("--runs", type=int, default=3, help="runs per size (interleaved)")
    parser.add_argument("--shard-size", type=int, default=DEFAULT_SHARD_SIZE, help="samples per shard")
    parser.add_argument("--rows-per-append", type=int, default=4, help="rows per append (a generator batch)")
    parser.add_argument("--dir", default=None, help="where the stores are written (default: the system temp dir)")
    parser.add_argument("--quick", action="store_true", help="smoke settings: 32 px, 16 samples, 2 runs")
    parser.add_argument("--out", default=str(common.RESULTS_DIR), help="folder for store_write.json")
    parser.add_argument("--results-md", default=str(common.RESULTS_MD), help='RESULTS.md to append to ("" to skip)')
    return parser


def _rows(fields: dict, count: int, rng: np.random.Generator) -> dict[str, np.ndarray]:
    rows = {}
    for name, field in fields.items():
        dtype = np.dtype(field.dtype)
        if dtype == np.uint8:
            rows[name] = rng.integers(0, 256, size=(count, *field.shape), dtype=np.uint8)
        else:
            rows[name] = rng.integers(0, 10, size=(count, *field.shape)).astype(dtype)
    return rows


def time_one_run(fields: dict, samples: int, shard_size: int, rows_per_append: int, root: str, seed: int) -> dict:
    """Seconds to append ``samples`` rows (every full shard sealed, a partial last one sealed too) and the bytes
    the shards hold; the payload is made before the clock starts."""
    rng = np.random.default_rng(seed)
    batches = [_rows(fields, min(rows_per_append, samples - start), rng)
               for start in range(0, samples, rows_per_append)]
    folder = tempfile.mkdtemp(prefix="store-write-", dir=root)
    try:
        writer = ShardWriter(folder, fields, shard_size)
        start = time.perf_counter()
        for rows in batches:
            writer.append(rows)
        writer.seal()
        seconds = time.perf_counter() - start
        shards = [os.path.join(folder, n) for n in os.listdir(folder) if n.endswith(".tar")]
        written = sum(os.path.getsize(s) for s in shards)
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    return {"seconds": seconds, "bytes": written, "shards": len(shards)}


def benchmark(args) -> dict:
    if args.quick:
        args.sizes, args.samples, args.runs = [32], 16, 2
    recipe = get_recipe(args.recipe)
    root = args.dir or tempfile.gettempdir()
    os.makedirs(root, exist_ok=True)
    runs: dict[int, list[dict]] = {size: [] for size in args.sizes}
    for run in range(args.runs):
        for size in args.sizes:  # interleaved: a slow moment of the disk hits every size alike
            runs[size].append(time_one_run(recipe.pool_fields(size), args.samples, args.shard_size,
                                           args.rows_per_append, root, seed=run))
    rows = []
    for size in args.sizes:
        per_sample = [r["seconds"] / args.samples for r in runs[size]]
        payload = sum(int(np.prod(f.shape)) * np.dtype(f.dtype).itemsize for f in recipe.pool_fields(size).values())
        written = runs[size][0]["bytes"] / args.samples
        median = statistics.median(per_sample)
        rows.append({"image_size": size, "median_ms_per_sample": median * 1e3, "min_ms_per_sample": min(per_sample) * 1e3,
                     "payload_bytes": payload, "written_bytes_per_sample": written,
                     "mb_per_s": written / median / 1e6, "shards_per_run": runs[size][0]["shards"]})
    settings = {"recipe": args.recipe, "sizes": args.sizes, "samples": args.samples, "runs": args.runs,
                "shard_size": args.shard_size, "rows_per_append": args.rows_per_append, "dir": root}
    notes = ["ShardWriter.append of random payloads, every shard sealed (fsync + rename) inside the timing",
             "median over interleaved runs of seconds per sample; written = tar bytes (headers, .npy, .json)"]
    return {"benchmark": "store_write", **common.environment("cpu"), "settings": settings, "rows": rows,
            "notes": notes}


COLUMNS = ("image size", "median ms/sample", "min ms/sample", "payload KB", "written KB/sample", "MB/s",
           "shards/run")


def table_rows(result: dict) -> list[list]:
    return [[r["image_size"], f"{r['median_ms_per_sample']:.3f}", f"{r['min_ms_per_sample']:.3f}",
             f"{r['payload_bytes'] / 1e3:.1f}", f"{r['written_bytes_per_sample'] / 1e3:.1f}", f"{r['mb_per_s']:.0f}",
             r["shards_per_run"]] for r in result["rows"]]


def report(result: dict, out_dir, results_md) -> dict:
    paths = {}
    if out_dir:
        paths["json"] = common.write_json(Path(out_dir) / "store_write.json", result)
    if results_md:
        s = result["settings"]
        paths["results_md"] = common.append_results_md(
            results_md, f"sample store writes: {s['recipe']}, shards of {s['shard_size']}", COLUMNS,
            table_rows(result), env=result, settings=s, notes=result["notes"])
    return paths


def print_summary(result: dict) -> None:
    s = result["settings"]
    print()
    print(f"sample store writes: {s['recipe']} payload, {s['samples']} samples x {s['runs']} runs per size, shards "
          f"of {s['shard_size']}, {s['rows_per_append']} rows per append, into {s['dir']} on {result['device']}")
    print(text_table(COLUMNS, table_rows(result)))


def main(argv=None) -> dict:
    return common.run_cli(sys.modules[__name__], argv)


if __name__ == "__main__":
    main()
