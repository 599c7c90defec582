#!/usr/bin/env python
"""Repack a dataset folder's parquet files smaller, with the same pixels, so more datasets fit in one device call.

    python bench/device/repack_parquet.py device_data/mnist device_data/fashion_mnist

A device call carries at most 64 MiB. Small greyscale PNGs (MNIST, FashionMNIST) spend much of their bytes on PNG
headers and per-image compression; stored as uncompressed PGM/PPM images in a zstd-19 parquet file, the images are
compressed together instead (MNIST 13.4 -> 9.9 MiB). Every image is decoded from both files and compared; a file is
replaced only where the repacked one is smaller and decodes to identical pixels. JPEG images (the CIFAR-10 copy) stay
as they are: decoded, they would be larger. The Hub features (``Image``, ``ClassLabel``) stay in the schema metadata,
so ``datasets`` and ``timm_asge.data.load_tensors`` read the folder as before.
"""
import argparse
import io
import os
import sys
from pathlib import Path

import datasets
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the checkout's timm_asge, installed or not
from timm_asge.data import find_columns  # noqa: E402


def repack(path: Path) -> str:
    """Repack one parquet file in place when that is smaller; returns what was done."""
    table = pq.read_table(path)
    features = datasets.Features.from_arrow_schema(table.schema)
    image_column, _ = find_columns(features)
    column = table.column(image_column)
    packed = []
    for value in column.to_pylist():
        image = Image.open(io.BytesIO(value['bytes']))
        if image.format != 'PNG' or image.mode not in ('L', 'RGB'):
            return f'{path}: kept ({image.format} {image.mode} images)'
        buffer = io.BytesIO()
        image.save(buffer, format='PPM')  # PGM for mode L: a 13-byte header (28x28) and the raw pixels
        packed.append({'bytes': buffer.getvalue(), 'path': value.get('path')})
    repacked = table.set_column(table.column_names.index(image_column), image_column,
                                pa.array(packed, type=column.type))
    tmp = path.with_name(path.name + '.tmp')
    pq.write_table(repacked, tmp, compression='zstd', compression_level=19)
    check = pq.read_table(tmp)
    if check.schema.metadata != table.schema.metadata:
        os.unlink(tmp)
        raise SystemExit(f'error: {path}: the repacked schema lost its metadata')
    if not check.drop_columns([image_column]).equals(table.drop_columns([image_column])):
        os.unlink(tmp)
        raise SystemExit(f'error: {path}: the repacked file differs outside the image column')
    for old, new in zip(column.to_pylist(), check.column(image_column).to_pylist(), strict=True):
        if not np.array_equal(np.asarray(Image.open(io.BytesIO(old['bytes']))),
                              np.asarray(Image.open(io.BytesIO(new['bytes'])))):
            os.unlink(tmp)
            raise SystemExit(f'error: {path}: a repacked image decodes to other pixels')
    before, after = path.stat().st_size, tmp.stat().st_size
    if after >= before:
        os.unlink(tmp)
        return f'{path}: kept ({before / 2**20:.1f} MiB; repacked {after / 2**20:.1f} MiB)'
    os.replace(tmp, path)
    return f'{path}: {before / 2**20:.1f} -> {after / 2**20:.1f} MiB, same pixels'


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('folders', nargs='+', type=Path, help='dataset folders of <split>-*.parquet files')
    args = parser.parse_args(argv)
    for folder in args.folders:
        files = sorted(folder.glob('*.parquet'))
        if not files:
            raise SystemExit(f'error: no parquet files in {folder}')
        for path in files:
            print(repack(path), flush=True)


if __name__ == '__main__':
    sys.exit(main())
