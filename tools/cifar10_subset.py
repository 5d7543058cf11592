"""Write a small CIFAR-10 in the official pickle layout (cifar-10-batches-py/) from the `.npz`
files of ../shared/data/cifar10 (images uint8 NHWC, labels), so that cifar10.py and its
preprocessing run unchanged on real images where the full 163 MB archive cannot travel.

    python tools/cifar10_subset.py SRC_DIR DEST_DIR [--train=data_batch_1.npz,...] [--test=test_batch_8000.npz]

The training images given (in order) are cut into the five data_batch_N files; run cifar10.py
with --data_dir=DEST_DIR --verify_checksums=False --train_set_size=<all but the validation part>.
"""
import argparse
import pickle
import sys
from pathlib import Path

import numpy as np


def read(path):
    with np.load(path) as f:
        images, labels = f["images"], f["labels"]
    # the official rows: 1024 R values, then G, then B, each 32x32 row-major
    return images.transpose(0, 3, 1, 2).reshape(len(images), 3072), labels


def write_batch(path, data, labels, name):
    batch = {"batch_label": name, "labels": [int(v) for v in labels],
             "data": np.ascontiguousarray(data, dtype=np.uint8),
             "filenames": [f"{i}.png" for i in range(len(data))]}
    with open(path, "wb") as f:
        pickle.dump(batch, f, protocol=2)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("src", type=Path)
    p.add_argument("dest", type=Path)
    p.add_argument("--train", default="data_batch_1.npz", help="comma-separated npz files")
    p.add_argument("--test", default="test_batch_8000.npz")
    p.add_argument("--limit", type=int, default=None,
                   help="keep only the first LIMIT training and test images (a rehearsal)")
    args = p.parse_args(argv)
    try:
        parts = [read(args.src / name) for name in args.train.split(",")]
        test = read(args.src / args.test)
    except (OSError, KeyError, ValueError) as e:
        sys.exit(f"error: cannot read the CIFAR-10 npz files in {args.src}: {e}")
    data = np.concatenate([d for d, _ in parts])[:args.limit]
    labels = np.concatenate([l for _, l in parts])[:args.limit]
    test = test[0][:args.limit], test[1][:args.limit]
    out = args.dest / "cifar-10-batches-py"
    out.mkdir(parents=True, exist_ok=True)
    for i, (d, l) in enumerate(zip(np.array_split(data, 5), np.array_split(labels, 5)), 1):
        write_batch(out / f"data_batch_{i}", d, l, f"training batch {i} of 5")
    write_batch(out / "test_batch", *test, "testing batch 1 of 1")
    print(f"{out}: {len(data)} training images in 5 batches, {len(test[0])} test images; a "
          "subset does not match the official checksums: train on it with "
          f"--data_dir={args.dest} --verify_checksums=False")


if __name__ == "__main__":
    main()
