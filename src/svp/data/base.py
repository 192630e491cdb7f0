"""Shared pieces of the dataset readers: errors, image loading, list-backed and
in-memory datasets, seeded validation carving.

Every dataset returned by :func:`svp.data.build_dataset` is a
``torch.utils.data.Dataset`` whose ``__getitem__`` gives ``(image, label)`` (a PIL
RGB image when no transform is set) and which carries ``.classes`` (names in
label order), ``.num_classes`` and ``.targets`` (one int per item).
"""
from __future__ import annotations

import contextlib
import logging
import os
import warnings
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
from PIL import Image

log = logging.getLogger("svp.data")

DOCS_HINT = "see docs/datasets.md for the expected layout"

IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")


from ..errors import DatasetError  # noqa: F401 (re-exported; the message names the path, see docs/datasets.md)


@contextlib.contextmanager
def open_text(path, newline=None):
    """A dataset's list or label file, opened as UTF-8 text (a byte-order mark is dropped). A file
    in another encoding (UTF-16, Latin-1) is a DatasetError naming it and the line, not a
    UnicodeDecodeError from wherever the text was read."""
    try:
        with open(path, "r", encoding="utf-8-sig", newline=newline) as f:
            yield f
    except UnicodeDecodeError:
        with open(path, "rb") as f:
            data = f.read()
        skip = 3 if data.startswith(b"\xef\xbb\xbf") else 0
        at = skip
        try:
            data[skip:].decode("utf-8")
        except UnicodeDecodeError as whole:   # its offset counts from the file's start, e's from a chunk
            at = skip + whole.start
        line = data.count(b"\n", 0, at) + 1
        bom16 = data[:2] in (b"\xff\xfe", b"\xfe\xff")
        raise DatasetError(f"{path}:{line}: not UTF-8 text (byte 0x{data[at]:02x} at offset {at}"
                           f"{'; the file starts like UTF-16' if bom16 else ''}); save it as UTF-8") from None


def leaves_folder(rel: str) -> bool:
    """Whether a split file's image path is absolute or climbs out of the folder it is relative to
    (``../../secret.png``): a data root prepared by someone else pulled the user's own files into
    training, silently (review41). (Links inside the folder are the user's to make.)"""
    norm = os.path.normpath(rel.replace("\\", "/")).replace("\\", "/")   # ('/' on every system)
    return (os.path.isabs(rel) or rel.startswith(("/", "\\")) or bool(os.path.splitdrive(rel)[0])
            or (len(rel) > 2 and rel[1] == ":" and rel[0].isalpha() and rel[2] in "/\\")   # (C:/ on any system)
            or norm == ".." or norm.startswith("../"))


def listed_path(base_dir: str, rel: str) -> str:
    """``base_dir`` joined with an image path a split file lists. A list written on Windows names
    its images with backslashes (``img\\a.jpg``), which elsewhere are a file name's own
    characters: every such image was refused as missing. Where the name as written is missing and
    its '/' form exists, the '/' form is read (one more stat per such line only)."""
    path = os.path.join(base_dir, rel)
    if "\\" in rel and os.sep == "/" and not os.path.lexists(path):
        alt = os.path.join(base_dir, rel.replace("\\", "/"))
        if os.path.lexists(alt):
            return alt
    return path


def missing(path, what: str, layout: str = "") -> DatasetError:
    msg = f"{what} not found: {path}"
    if layout:
        msg += f"\nexpected layout:\n{layout.rstrip()}"
    msg += f"\n({DOCS_HINT})"
    return DatasetError(msg)


def require_dir(path, what: str, layout: str = "") -> str:
    path = os.fspath(path)
    if not os.path.isdir(path):
        raise missing(path, what, layout)
    return path


def require_file(path, what: str, layout: str = "") -> str:
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise missing(path, what, layout)
    return path


_TIFF_EXTENSIONS = (".tif", ".tiff")
_logged_rules: set = set()  # scaling rules already announced once in this process


def warn_repeats(name: str, source: str, entries: Sequence[Tuple[str, int, object]]) -> None:
    """Say (one warning) when a list names an image more than once: ``entries`` are (image path,
    line number, label) in the list's order. Each line stays a sample of its own, as the official
    loaders read it (weighted twice in training and in the accuracy), but it is more often a list
    concatenated twice, or an edit gone wrong where the two labels differ, than a choice."""
    first: Dict[str, Tuple[int, object]] = {}
    repeats, conflicts = [], []
    for path, lineno, label in entries:
        p = os.path.normpath(path)
        if p in first:
            (conflicts if first[p][1] != label else repeats).append((lineno, first[p][0], label, first[p][1]))
        else:
            first[p] = (lineno, label)
    if conflicts:
        ln, first_ln, lab, first_lab = conflicts[0]
        log.warning("%s: %d line(s) of %s list an image already listed with another label (line %d: %s, line %d: "
                    "%s); each line is a sample of its own, under its own label", name, len(conflicts), source, ln,
                    lab, first_ln, first_lab)
    if repeats:
        log.warning("%s: %d line(s) of %s list an image already listed (line %d repeats line %d); each line is a "
                    "sample of its own", name, len(repeats), source, repeats[0][0], repeats[0][1])


def _announce(rule: str, path: str) -> None:
    # A float dataset would otherwise log one line per image per epoch.
    if rule not in _logged_rules:
        _logged_rules.add(rule)
        log.warning("%s: %s (logged once; later images scaled the same way are not)", path, rule)


def _to_uint8(a: np.ndarray, path: str) -> np.ndarray:
    """Scale a decoded pixel array to uint8 by its real range (docs/datasets.md, "Image
    bit depth"): uint8 as is; 16-bit (and ints within 0..65535) by the full 0..65535 range,
    keeping the top 8 bits as Pillow does for 16-bit RGB PNGs, so that brightness means
    the same in every image; float in [0, 1] times 255; any other range (float or int) by
    the image's own min..max, with a warning, since no fixed range is known."""
    if a.dtype == np.uint8:
        return a
    if a.dtype.kind == "b":
        return a.astype(np.uint8) * 255
    if a.dtype.kind not in "uif":
        raise DatasetError(f"unreadable image: {path}: pixel type {a.dtype} is not supported")
    kind = a.dtype.name if a.dtype.kind == "f" else "integer"   # (the file's: a float32 TIFF said float64)
    if a.dtype.kind == "f":
        a = a.astype(np.float64)
        if not np.isfinite(a).all():
            raise DatasetError(f"unreadable image: {path}: float image with NaN/inf pixels "
                               f"(expected finite values; see docs/datasets.md, image bit depth)")
        lo, hi = (float(a.min()), float(a.max())) if a.size else (0.0, 1.0)
        if lo >= 0.0 and hi <= 1.0:
            return np.rint(a * 255.0).astype(np.uint8)
    else:
        lo, hi = (int(a.min()), int(a.max())) if a.size else (0, 0)
        if lo >= 0 and hi <= 65535:
            return (a.astype(np.uint32) >> 8).astype(np.uint8)
        a = a.astype(np.float64)
    _announce(f"{kind} pixels in "
              f"{lo:g}..{hi:g} are outside the known range, scaled by the image's own min..max", path)
    if hi <= lo:
        return np.zeros(a.shape, np.uint8)
    return np.rint((a - lo) * (255.0 / (hi - lo))).astype(np.uint8)


def _array_to_rgb(a: np.ndarray, path: str) -> Image.Image:
    if a.ndim == 3 and a.shape[2] in (1, 2):  # gray (+ alpha)
        a = a[:, :, 0]
    if not (a.ndim == 2 or (a.ndim == 3 and a.shape[2] in (3, 4))):
        raise DatasetError(f"unreadable image: {path}: pixel array of shape {a.shape}; expected "
                           f"(H, W) or (H, W, 3|4)")
    a = _to_uint8(a, path)
    if a.ndim == 2:
        return Image.fromarray(a, mode="L").convert("RGB")
    return Image.fromarray(np.ascontiguousarray(a[:, :, :3]), mode="RGB")


def _unsigned_32(im: Image.Image) -> bool:
    """A TIFF of unsigned 32-bit pixels, which Pillow decodes to its signed mode "I": values
    from 2**31 up wrapped to negatives (the brightest pixels came out darkest, QA 16b). The
    TIFF's SampleFormat (tag 339) is unsigned (1) unless it says otherwise."""
    tags = getattr(im, "tag_v2", None)
    if im.mode != "I" or tags is None:
        return False
    first = lambda v, default: (v[0] if isinstance(v, tuple) and v else default if v is None else v)  # noqa: E731
    return first(tags.get(258), 0) == 32 and first(tags.get(339), 1) == 1


def to_rgb(im: Image.Image, path: str = "<image>") -> Image.Image:
    """8-bit RGB of a decoded PIL image. Pillow's own ``convert("RGB")`` clips 16-bit and
    32-bit modes at 255 and truncates floats, so those go through :func:`_to_uint8`."""
    if im.mode.startswith("I") or im.mode == "F":
        a = np.asarray(im)
        return _array_to_rgb(a.view(np.uint32) if _unsigned_32(im) else a, path)
    return im.convert("RGB")


def _read_tiff(path: str) -> Image.Image:
    """TIFFs Pillow cannot decode (multi-channel float, some 16-bit layouts) via tifffile,
    which scikit-image (a dependency) brings along."""
    import tifffile
    with tifffile.TiffFile(path) as tf:
        series = tf.series[0]
        shape = tuple(series.shape)
        # Pillow's decompression-bomb bound, from the header: a 1 MB compressed TIFF decoded to
        # 2 GB (and to several copies of it in _to_uint8) when Pillow had refused it
        channels = 1
        if len(shape) > 2:   # (H, W, C) or planar (C, H, W); more pages count as more pixels
            channels = shape[-1] if shape[-1] <= 4 else (shape[0] if shape[0] <= 4 else 1)
        pixels = int(np.prod(shape, dtype=np.float64)) // max(1, channels)
        limit = Image.MAX_IMAGE_PIXELS
        if limit and pixels > limit:
            raise DatasetError(f"unreadable image: {path}: {pixels:,} pixels ({'x'.join(map(str, shape))}) exceed "
                               f"the decompression-bomb limit of {limit:,} (PIL.Image.MAX_IMAGE_PIXELS)")
        a = np.asarray(series.asarray())
    if a.ndim == 3 and a.shape[0] in (3, 4) and a.shape[2] not in (3, 4):
        a = np.moveaxis(a, 0, -1)  # planar (C, H, W)
    return _array_to_rgb(a, path)


_NOT_OPENED = ("EPS",)   # PostScript: Pillow hands it to Ghostscript where that is installed


def _raster_formats():
    """Every format Pillow opens but PostScript: a dataset file or an image given to svp predict
    named evil.jpg that holds PostScript ran Ghostscript on it (svp serve opens a shorter list)."""
    Image.init()
    return [f for f in Image.OPEN if f not in _NOT_OPENED]


def special_file(path: str) -> bool:
    """Whether ``path`` leads to something that is neither a regular file nor a folder, nor
    missing: a pipe, a device or a socket, which reading would wait on or read forever (a link to
    nothing is missing, said as such where it is read)."""
    return os.path.exists(path) and not os.path.isfile(path) and not os.path.isdir(path)


def walk_folders(top: str, key: Optional[Callable] = None, onerror: Optional[Callable] = None,
                 fenced: Optional[Callable[[str], bool]] = None):
    """(folder, file names) of ``top`` and every folder below it but hidden ones, depth first, each
    folder's subfolders in sorted order (by ``key``), linked folders followed (as torchvision's
    ImageFolder does) and each folder walked once: a link to a parent is no loop, and of two links
    to one folder the first met counts. Hidden folders are left before they count as walked (a
    hidden link '.alias' -> 'pics', met first, left pics' images out: retest 86). ``fenced(path)``:
    whether a folder below ``top`` is not to be entered (a dataset's root, splits and other classes'
    folders, which a class folder's link to a parent led into: retest 88). ``onerror``: os.walk's,
    called where that folder's files would have come. The imagefolder dataset and ``svp predict``'s
    folders both walk so."""
    seen = set()
    for dirpath, dirs, files in os.walk(top, onerror=onerror, followlinks=True):
        st = os.stat(dirpath)
        if (st.st_dev, st.st_ino) in seen or (fenced is not None and dirpath != top and fenced(dirpath)):
            dirs[:] = []
            continue
        seen.add((st.st_dev, st.st_ino))
        dirs[:] = sorted((d for d in dirs if not d.startswith(".")), key=key)
        yield dirpath, files


def load_image(path: str) -> Image.Image:
    """Open an image fully (so truncated files fail here, not later) as 8-bit RGB, high
    bit depths scaled by :func:`to_rgb`. The one reader of image files: datasets
    and ``svp viz`` come through here (``svp predict`` is to, too)."""
    path = os.fspath(path)
    try:
        with warnings.catch_warnings():
            # below the bound Pillow refuses (DecompressionBombError, below), an image is read
            # as it is: its warning between half that bound and the bound went raw to stderr
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(path, formats=_raster_formats()) as im:
                im.load()
                return to_rgb(im, path)
    except FileNotFoundError:
        # (no pointer to the dataset layouts: a dataset's files are checked when it is built, so
        # this is a single image given by name, `svp predict` / `svp visualize`)
        if os.path.islink(path):   # (listed in its folder: "not found" read as a wrong name)
            raise DatasetError(f"image not found: {path} is a link to nothing ({os.readlink(path)})") from None
        raise DatasetError(f"image not found: {path}{_case_hint(path)}") from None
    except DatasetError:
        raise
    except Image.DecompressionBombError as e:   # (not retried through tifffile, which has no bound)
        raise DatasetError(f"unreadable image: {path}: {e}") from None
    except MemoryError:   # the process's, not the file's: "unreadable image: MemoryError" misled
        raise
    except Exception as e:  # PIL raises OSError / UnidentifiedImageError / SyntaxError
        if path.lower().endswith(_TIFF_EXTENSIONS):
            try:
                return _read_tiff(path)
            except DatasetError:
                raise
            except Exception:
                pass  # report Pillow's error, the more familiar one
        raise DatasetError(f"unreadable image: {path}: {type(e).__name__}: {e}") from None


class VisionDataset(torch.utils.data.Dataset):
    """Common attributes. Subclasses implement ``_load(i) -> PIL image`` and set
    ``targets`` and ``classes``."""

    name: str = ""
    split: str = ""

    def __init__(self, classes: Sequence[str], targets: Sequence[int],
                 transform: Optional[Callable] = None, name: str = "", split: str = ""):
        self.classes = [str(c) for c in classes]
        self.targets = [int(t) for t in targets]
        self.transform = transform
        self.name = name
        self.split = split

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def __len__(self) -> int:
        return len(self.targets)

    def _load(self, i: int) -> Image.Image:  # pragma: no cover - abstract
        raise NotImplementedError

    @property
    def skip_bad_images(self) -> bool:
        """Whether an unreadable image is replaced by the next readable item of this dataset."""
        return False

    def _met_bad(self, i: int, error: Exception, split: Optional[str] = None) -> None:
        """Item ``i`` could not be read and was skipped (recorded by the dataset that owns the file;
        ``split``: the name of the split it was read through, a carve's or an expression's)."""

    def __getitem__(self, i: int):
        if not self.skip_bad_images:
            j, img = i, self._load(i)
        else:
            # the next readable item of this dataset, not of the list it was cut from: a subset's
            # neighbour in the whole list may belong to the other side of a train/val carve
            n = len(self)
            for k in range(n):
                j = (i + k) % n
                try:
                    img = self._load(j)
                    break
                except DatasetError as e:
                    self._met_bad(j, e)
            else:
                raise DatasetError(f"{self.name}/{self.split}: no readable image at all")
        if self.transform is not None:
            img = self.transform(img)
        return img, self.targets[j]

    def class_counts(self) -> List[int]:
        return np.bincount(np.asarray(self.targets, dtype=np.int64),
                           minlength=self.num_classes).tolist()

    def describe(self, i: int) -> str:
        """A human-readable name of item i (its file for on-disk data)."""
        return f"{self.name}[{self.split}][{i}]"

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(name={self.name!r}, split={self.split!r}, "
                f"items={len(self)}, classes={self.num_classes})")


def _case_hint(path: str) -> str:
    """' (... exists ...)' when a file differing from ``path`` only in case does (000001.JPG listed as
    000001.jpg: a copy made on a case-insensitive file system), else ''."""
    folder, base = os.path.split(path)
    try:
        near = [n for n in os.listdir(folder or ".") if n.lower() == base.lower() and n != base]
    except OSError:
        return ""
    return (f" ({os.path.join(folder, near[0])} exists: file names are case-sensitive here; rename the files "
            f"or fix the list)") if near else ""


class FileListDataset(VisionDataset):
    """Images listed as (path, label) pairs.

    Every listed file is checked for existence when the dataset is built (a cheap
    ``os.path.isfile`` per file). Missing files raise :class:`DatasetError` naming
    them, unless ``skip_bad_images`` is set: then they are dropped and the count is
    logged. Unreadable/truncated images raise when read; with ``skip_bad_images``
    the item is replaced by the next readable one, and each bad file is logged and listed in
    ``self.skipped`` the first time this process meets it (a loader's workers each keep
    their own list; the log line names the worker).
    """

    def __init__(self, samples: Sequence[Tuple[str, int]], classes: Sequence[str],
                 transform: Optional[Callable] = None, name: str = "", split: str = "",
                 skip_bad_images: bool = False, check_files: bool = True,
                 source: str = ""):
        samples = [(os.fspath(p), int(t)) for p, t in samples]
        self._skip = bool(skip_bad_images)
        self.skipped: List[str] = []
        self.source = source
        if check_files:
            absent = [p for p, _ in samples if not os.path.isfile(p)]
            if absent:
                where = f" (listed in {source})" if source else ""
                if skip_bad_images:
                    log.warning("%s/%s: skipping %d missing image(s)%s, e.g. %s",
                                name, split, len(absent), where, absent[0])
                    gone = set(absent)
                    samples = [s for s in samples if s[0] not in gone]
                    self.skipped.extend(absent)
                else:
                    shown = "\n  ".join(absent[:10])
                    more = f"\n  ... and {len(absent) - 10} more" if len(absent) > 10 else ""
                    hint = _case_hint(absent[0]).strip()
                    more += f"\n  {hint}" if hint else ""
                    raise DatasetError(
                        f"{name}/{split}: {len(absent)} of {len(samples) } listed image(s) "
                        f"missing{where}:\n  {shown}{more}\n({DOCS_HINT}; pass "
                        f"skip_bad_images=True to drop them with a logged count)")
        if not samples:  # an empty split would train on nothing or report a NaN accuracy, not fail
            raise DatasetError(f"{name}/{split}: no images"
                               + (f" left after dropping the missing ones (listed in {source})" if self.skipped
                                  else f" listed in {source}" if source else "")
                               + f"; expected at least one ({DOCS_HINT})")
        self.samples = samples
        super().__init__(classes, [t for _, t in samples], transform, name, split)
        n = len(self.classes)
        bad = [t for t in self.targets if not 0 <= t < n]
        if bad:
            raise DatasetError(f"{name}/{split}: label {bad[0]} outside 0..{n - 1}"
                               + (f" in {source}" if source else ""))

    @property
    def skip_bad_images(self) -> bool:
        return self._skip

    def describe(self, i: int) -> str:
        return self.samples[i][0]

    def _load(self, i: int) -> Image.Image:
        return load_image(self.samples[i][0])

    def _met_bad(self, i: int, error: Exception, split: Optional[str] = None) -> None:
        path = self.samples[i][0]
        if path not in self.skipped:   # each file once (it is met again every epoch)
            self.skipped.append(path)
            # a loader's workers each hold their own copy of this list: the count is
            # what this process met, and says so (svp data check counts them all)
            worker = torch.utils.data.get_worker_info()
            log.warning("%s (skipped; %d bad image(s) met so far in %s/%s%s)", error, len(self.skipped),
                        self.name, split or self.split, f" by data worker {worker.id}" if worker else "")


class ArrayDataset(VisionDataset):
    """Images held in memory as a uint8 array (N, H, W, 3) or (N, H, W)."""

    def __init__(self, images: np.ndarray, targets: Sequence[int], classes: Sequence[str],
                 transform: Optional[Callable] = None, name: str = "", split: str = ""):
        images = np.asarray(images)
        if images.dtype != np.uint8:
            raise TypeError("ArrayDataset wants uint8 images")
        if len(images) != len(targets):
            raise ValueError("images and targets differ in length")
        self.images = images
        super().__init__(classes, targets, transform, name, split)

    def _load(self, i: int) -> Image.Image:
        a = self.images[i]
        if a.ndim == 2:
            return Image.fromarray(a, mode="L").convert("RGB")
        return Image.fromarray(a, mode="RGB")


class SubsetDataset(VisionDataset):
    """A fixed subset of another dataset (keeps classes, maps targets)."""

    def __init__(self, base: VisionDataset, indices: Sequence[int], split: str = "",
                 transform: Optional[Callable] = None):
        self.base = base
        self.indices = [int(i) for i in indices]
        super().__init__(base.classes, [base.targets[i] for i in self.indices],
                         transform, base.name, split or base.split)

    @property
    def skipped(self) -> List[str]:
        return list(getattr(self.base, "skipped", []))

    @property
    def skip_bad_images(self) -> bool:
        return bool(getattr(self.base, "skip_bad_images", False))

    @property
    def samples(self) -> List[Tuple[str, int]]:
        """The (path, label) of each item, where the base has files (a few-shot draw or a carve of a
        folder): what the overlap check of svp train compares (it said nothing for them: retest 91)."""
        base = getattr(self.base, "samples", None)
        if base is None:
            raise AttributeError("samples")   # (held in memory: getattr's default applies)
        return [base[i] for i in self.indices]

    def describe(self, i: int) -> str:
        return self.base.describe(self.indices[i])

    def _load(self, i: int) -> Image.Image:
        return self.base._load(self.indices[i])

    def _met_bad(self, i: int, error: Exception, split: Optional[str] = None) -> None:
        if hasattr(self.base, "_met_bad"):   # (logged under this split's name: a carved val's under train)
            self.base._met_bad(self.indices[i], error, split or self.split)


class ConcatSplits(VisionDataset):
    """Several datasets of the same classes one after the other (``train+val``)."""

    def __init__(self, parts: Sequence[VisionDataset], split: str = "",
                 transform: Optional[Callable] = None):
        classes = parts[0].classes
        for p in parts[1:]:
            if p.classes != classes:
                raise DatasetError(f"{parts[0].name}: cannot join split {p.split!r} to {parts[0].split!r}: "
                                   f"their class lists differ")
        self.parts = list(parts)
        self._where = [(k, i) for k, p in enumerate(self.parts) for i in range(len(p))]
        super().__init__(classes, [t for p in self.parts for t in p.targets], transform,
                         parts[0].name, split)

    @property
    def skipped(self) -> List[str]:
        return [p for part in self.parts for p in getattr(part, "skipped", [])]

    @property
    def skip_bad_images(self) -> bool:
        return any(getattr(p, "skip_bad_images", False) for p in self.parts)

    @property
    def samples(self) -> List[Tuple[str, int]]:
        parts = [getattr(p, "samples", None) for p in self.parts]
        if any(p is None for p in parts):
            raise AttributeError("samples")
        return [s for p in parts for s in p]

    def describe(self, i: int) -> str:
        k, j = self._where[i]
        return self.parts[k].describe(j)

    def _load(self, i: int) -> Image.Image:
        k, j = self._where[i]
        return self.parts[k]._load(j)

    def _met_bad(self, i: int, error: Exception, split: Optional[str] = None) -> None:
        k, j = self._where[i]
        if hasattr(self.parts[k], "_met_bad"):
            self.parts[k]._met_bad(j, error, split or self.split)


def seeded_shuffle(n: int, seed: int) -> np.ndarray:
    return np.random.RandomState(seed).permutation(n)


def few_shot_indices(targets: Sequence[int], shots: int, seed: int = 0) -> List[int]:
    """Indices (sorted: the dataset's order) of ``shots`` items of each class, drawn per class
    with ``seed``; a class with fewer keeps all of its items. Each class's draw is the start of
    one seeded permutation of its items, the permutations drawn in class order whatever ``shots``
    is, so a seed's smaller draws are inside its larger ones (its 4 items of a class are among its
    8)."""
    if int(shots) < 1:
        raise ValueError(f"shots must be a positive integer, got {shots}")
    return sorted(i for idx in _shuffled_classes(targets, seed) for i in idx[:int(shots)].tolist())


def _shuffled_classes(targets, seed: int):
    """Each class's item indices, in one seeded permutation per class, class by class in label
    order: the draw both ``few_shot_indices`` and ``carve_validation`` take their items from."""
    targets = np.asarray(targets, dtype=np.int64)
    rng = np.random.RandomState(seed)
    for c in np.unique(targets):
        idx = np.flatnonzero(targets == c)
        yield idx[rng.permutation(len(idx))]


def carve_validation(targets: Sequence[int], fraction: float, seed: int = 0
                     ) -> Tuple[List[int], List[int]]:
    """Split indices 0..N-1 into (train, val) with a seeded, per-class stratified
    draw: each class gives round(fraction * n_c) items to val (at least one when
    the class has two or more items). Deterministic given ``seed``."""
    if not 0.0 < fraction < 1.0:
        raise ValueError(f"val_from_train must be in (0, 1), got {fraction}")
    val: List[int] = []
    for idx in _shuffled_classes(targets, seed):
        k = int(round(fraction * len(idx)))
        if len(idx) >= 2:
            k = min(max(k, 1), len(idx) - 1)
        else:
            k = 0
        val.extend(idx[:k].tolist())
    val_set = set(val)
    train = [i for i in range(len(targets)) if i not in val_set]
    return train, sorted(val)
