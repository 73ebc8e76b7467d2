"""Registry of the datasets used in the experiments of Liu et al., "Deep Hyperspherical Learning"
(NIPS 2017, arXiv:1711.03189), Section 5 (CIFAR-10, CIFAR-10+, CIFAR-100, MNIST-style digits for the
2-D feature visualisation), plus Fashion-MNIST, the drop-in MNIST replacement that ships as a Debian
package and is therefore available offline.

Each :class:`DatasetSpec` says what the files are called, where they usually live relative to a
search root, how many images each split must hold, which checksums the content must match, and
where to download it. Where the data come from and how they are checked is documented in the
module docstrings of :mod:`.discovery`, :mod:`.checksums` and :mod:`.download`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ..errors import DatasetError

# The two splits every dataset has.
SPLITS = ("train", "test")


@dataclass(frozen=True)
class DatasetInfo:
    """What a model needs to know about a dataset.

    ``image_size`` is the side of the (square) images, or ``(height, width)`` for a non-square image
    folder; ``class_names[i]`` is the name of label ``i``.
    """

    name: str
    num_classes: int
    in_channels: int
    image_size: int | tuple[int, int]
    class_names: tuple[str, ...] = field(default=())


@dataclass(frozen=True)
class RemoteFile:
    """One file to download: its name on the mirror and, where published, the MD5 of its bytes.

    ``extract`` marks a tar archive that unpacks into the dataset directory. A file without an MD5
    is verified through the content checksums of its dataset instead (see :mod:`.checksums`).
    """

    filename: str
    md5: str | None = None
    extract: bool = False


@dataclass(frozen=True)
class DatasetSpec:
    """Files, layout, checks and download sources of one on-disk dataset.

    - ``reader``: ``"idx"`` or ``"cifar"``, the on-disk format.
    - ``split_files``: per split, the files to read (IDX: images then labels, without ``.gz``; the
      gzip-compressed ``<name>.gz`` is accepted as well).
    - ``split_counts``: how many images each split holds (a structural check).
    - ``content_sha256``: SHA-256 of the decompressed content of each file, where known.
    - ``layouts``: subdirectories of a search root that may hold the files, most specific first; the
      first one is where downloads go; ``""`` is the root itself.
    - ``label_key``: the label entry of a CIFAR pickle (``labels`` or ``fine_labels``).
    - ``mirrors``: base URLs tried in order; ``downloads``: the files to fetch from them.
    - ``system_package``: the Debian package that installs the data, if any.
    """

    info: DatasetInfo
    reader: str
    split_files: dict[str, tuple[str, ...]]
    split_counts: dict[str, int]
    layouts: tuple[str, ...]
    mirrors: tuple[str, ...]
    downloads: tuple[RemoteFile, ...]
    content_sha256: dict[str, str] = field(default_factory=dict)
    label_key: str = "labels"
    system_package: str | None = None


# fmt: off
FASHION_MNIST_CLASSES = (
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
)
MNIST_CLASSES = tuple(str(d) for d in range(10))
CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
# CIFAR-100 fine labels in label order (alphabetical, as in the archive's ``meta`` file).
CIFAR100_CLASSES = (
    "apple", "aquarium_fish", "baby", "bear", "beaver", "bed", "bee", "beetle", "bicycle", "bottle",
    "bowl", "boy", "bridge", "bus", "butterfly", "camel", "can", "castle", "caterpillar", "cattle",
    "chair", "chimpanzee", "clock", "cloud", "cockroach", "couch", "crab", "crocodile", "cup", "dinosaur",
    "dolphin", "elephant", "flatfish", "forest", "fox", "girl", "hamster", "house", "kangaroo", "keyboard",
    "lamp", "lawn_mower", "leopard", "lion", "lizard", "lobster", "man", "maple_tree", "motorcycle", "mountain",
    "mouse", "mushroom", "oak_tree", "orange", "orchid", "otter", "palm_tree", "pear", "pickup_truck", "pine_tree",
    "plain", "plate", "poppy", "porcupine", "possum", "rabbit", "raccoon", "ray", "road", "rocket",
    "rose", "sea", "seal", "shark", "shrew", "skunk", "skyscraper", "snail", "snake", "spider",
    "squirrel", "streetcar", "sunflower", "sweet_pepper", "table", "tank", "telephone", "television", "tiger",
    "tractor", "train", "trout", "tulip", "turtle", "wardrobe", "whale", "willow_tree", "wolf", "woman", "worm",
)
# fmt: on

_IDX_SPLIT_FILES: dict[str, tuple[str, ...]] = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
_IDX_COUNTS = {"train": 60000, "test": 10000}
_CIFAR_COUNTS = {"train": 50000, "test": 10000}

DATASETS: dict[str, DatasetSpec] = {
    "fashion-mnist": DatasetSpec(
        info=DatasetInfo("fashion-mnist", 10, 1, 28, FASHION_MNIST_CLASSES),
        reader="idx",
        split_files=_IDX_SPLIT_FILES,
        split_counts=_IDX_COUNTS,
        # SHA-256 of the decompressed IDX files. Computed from Debian's dataset-fashion-mnist package;
        # the content equals upstream's (only the gzip wrappers differ, so gz checksums cannot be used).
        content_sha256={
            "train-images-idx3-ubyte": "c59f468a2f672dc815687fe0f83887768d799fd8a3f3276145d20f83aa44d888",
            "train-labels-idx1-ubyte": "bad3541b69d912435c50bb6ba87bec294ff4f6a2e1246121d8633921760443d9",
            "t10k-images-idx3-ubyte": "5b4141f0afbad91edebe8549f8fcffe087ea10ca49f1dbef5c9a5cd8815ce37b",
            "t10k-labels-idx1-ubyte": "0402a96d92fd2663957122ceb108a494c5af83dab82d92729df917d7dec38c34",
        },
        layouts=("fashion-mnist", "FashionMNIST/raw", ""),
        mirrors=("http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/",),
        downloads=tuple(RemoteFile(name + ".gz") for names in _IDX_SPLIT_FILES.values() for name in names),
        system_package="dataset-fashion-mnist",
    ),
    "mnist": DatasetSpec(
        info=DatasetInfo("mnist", 10, 1, 28, MNIST_CLASSES),
        reader="idx",
        split_files=_IDX_SPLIT_FILES,
        split_counts=_IDX_COUNTS,
        layouts=("mnist", "MNIST/raw", ""),
        mirrors=("https://ossci-datasets.s3.amazonaws.com/mnist/", "http://yann.lecun.com/exdb/mnist/"),
        # MD5 of the published gzip files (http://yann.lecun.com/exdb/mnist/).
        downloads=(
            RemoteFile("train-images-idx3-ubyte.gz", "f68b3c2dcbeaaa9fbdd348bbdeb94873"),
            RemoteFile("train-labels-idx1-ubyte.gz", "d53e105ee54ea40749a09fcbcd1e9432"),
            RemoteFile("t10k-images-idx3-ubyte.gz", "9fb629c4189551a2d022fa330f9573f3"),
            RemoteFile("t10k-labels-idx1-ubyte.gz", "ec29112dd5afa0611ce80d1b7f02629c"),
        ),
    ),
    "cifar10": DatasetSpec(
        info=DatasetInfo("cifar10", 10, 3, 32, CIFAR10_CLASSES),
        reader="cifar",
        split_files={"train": tuple(f"data_batch_{i}" for i in range(1, 6)), "test": ("test_batch",)},
        split_counts=_CIFAR_COUNTS,
        layouts=("cifar-10-batches-py", "cifar10/cifar-10-batches-py", "cifar-10/cifar-10-batches-py", ""),
        mirrors=("https://www.cs.toronto.edu/~kriz/",),
        # MD5 of the published archive (https://www.cs.toronto.edu/~kriz/cifar.html).
        downloads=(RemoteFile("cifar-10-python.tar.gz", "c58f30108f718f92721af3b95e74349a", extract=True),),
        label_key="labels",
    ),
    "cifar100": DatasetSpec(
        info=DatasetInfo("cifar100", 100, 3, 32, CIFAR100_CLASSES),
        reader="cifar",
        split_files={"train": ("train",), "test": ("test",)},
        split_counts=_CIFAR_COUNTS,
        layouts=("cifar-100-python", "cifar100/cifar-100-python", "cifar-100/cifar-100-python", ""),
        mirrors=("https://www.cs.toronto.edu/~kriz/",),
        downloads=(RemoteFile("cifar-100-python.tar.gz", "eb9058c3a382ffc7106e4002c42a8d85", extract=True),),
        label_key="fine_labels",
    ),
}

# A folder of class-named image subfolders (see :mod:`.image_folder`); it has no fixed spec.
FOLDER = "folder"

_ALIASES = {
    "fashion_mnist": "fashion-mnist",
    "fashionmnist": "fashion-mnist",
    "fmnist": "fashion-mnist",
    "cifar-10": "cifar10",
    "cifar_10": "cifar10",
    "cifar-100": "cifar100",
    "cifar_100": "cifar100",
    "imagefolder": FOLDER,
    "image-folder": FOLDER,
    "image_folder": FOLDER,
}


def list_datasets() -> list[str]:
    """Names accepted by :func:`~sphereconv.data.load_dataset`, sorted."""
    return sorted([*DATASETS, FOLDER])


def canonical_name(name: str) -> str:
    """Return the registry name of ``name`` (case-insensitive, aliases allowed).

    Raises :class:`DatasetError` listing the allowed names when ``name`` is unknown.
    """
    if not isinstance(name, str):
        raise DatasetError(f"dataset name must be a string, one of {', '.join(list_datasets())}; got {name!r}")
    key = name.strip().lower()
    key = _ALIASES.get(key, key)
    if key not in DATASETS and key != FOLDER:
        raise DatasetError(f"unknown dataset {name!r}; allowed: {', '.join(list_datasets())}")
    return key


def get_spec(name: str) -> DatasetSpec:
    """The :class:`DatasetSpec` of an on-disk dataset (not ``folder``, which has none)."""
    key = canonical_name(name)
    if key == FOLDER:
        raise DatasetError("the 'folder' dataset has no fixed spec; it is read from the directory given as data_dir")
    return DATASETS[key]


def check_split(split: str) -> str:
    """Return ``split`` if it is ``train`` or ``test``, else raise ``ValueError``."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {', '.join(SPLITS)}; got {split!r}")
    return split
