"""Dataset sources in their native formats. Each returns a :class:`DatasetDescription`.

    clothing1m(root, split), balanced_subset(description, num_batches, batch_size, seed)
    webvision(root, split, num_classes=50)
    image_folder(root), file_list(path, root=None)
    cifar(root, which, split="train")
    fashion_mnist(root=None, split="train")
    from_arrays(images, labels, ...)
    read_idx(path)                      the IDX array reader behind fashion_mnist
    read_path_label_list(path), read_path_list(path)
                                        the shared list-file parser (errors name file and line)

The sources that read list files (clothing1m, webvision, file_list) take
``allow_outside_root=False``: a listed path that leads outside the directory the list is
relative to (``../x``, ``a/../../x``, ``/etc/passwd``, or the directory itself) is a
ListFileError naming the list file and line, unless the caller opts in with True. The test is
lexical (after ``os.path.normpath``); symbolic links inside the root are followed, so
symlink-farm datasets keep working (the reasons are in ``listfile.resolve_entries``).
"""
from mixnn_fast.data.arrays import from_arrays
from mixnn_fast.data.cifar import cifar
from mixnn_fast.data.clothing1m import balanced_subset, clothing1m
from mixnn_fast.data.description import DatasetDescription
from mixnn_fast.data.fashion_mnist import fashion_mnist
from mixnn_fast.data.folders import file_list, image_folder
from mixnn_fast.data.idx import read_idx
from mixnn_fast.data.listfile import ListFileError, read_path_label_list, read_path_list
from mixnn_fast.data.webvision import webvision

__all__ = [
    "DatasetDescription",
    "ListFileError",
    "balanced_subset",
    "cifar",
    "clothing1m",
    "fashion_mnist",
    "file_list",
    "from_arrays",
    "image_folder",
    "read_idx",
    "read_path_label_list",
    "read_path_list",
    "webvision",
]
