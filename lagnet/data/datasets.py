"""Person re-ID datasets: folder and list-file parsers, and an image ``Dataset`` wrapper.

Every dataset object exposes ``train``, ``query`` and ``gallery`` as lists of
:class:`ReIDRecord`. Training identities are relabelled to ``0..N-1`` in sorted order of the
original identity; query and gallery keep the identities of the file names. Camera ids are
0-based. Images with identity ``-1`` (junk detections) are dropped; non-image files and
sub-folders of a split folder are ignored. Anything else is an error naming the file, never
silently skipped: a name the parser cannot read, an identity below ``-1`` or a camera below the
first camera number, a link to a missing file, an unreadable image, an empty split.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
from PIL import Image, ImageOps
from torch.utils.data import Dataset
from torchvision.transforms import functional as tvf

from lagnet._validation import check_nonnegative_int, show_some

__all__ = [
    "CUHK03NP",
    "DATASET_NAMES",
    "IMAGE_EXTENSIONS",
    "MSMT17",
    "DukeMTMCreID",
    "ImageDataset",
    "Market1501",
    "ReIDDataset",
    "ReIDFolder",
    "ReIDRecord",
    "build_dataset",
    "read_image",
]

IMAGE_EXTENSIONS: frozenset[str] = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".webp"})
"""File suffixes (lower case) treated as images; other files in a split folder are ignored."""

JUNK_PID = -1
"""Identity of junk detections in the Market-1501 family; such images are never loaded."""

_MAX_LISTED = 5  # how many offending names an error message shows

NameParser = Callable[[str], tuple[int, int] | None]


class ReIDRecord(NamedTuple):
    """One image: its path, identity and 0-based camera id."""

    path: str
    pid: int
    camid: int


def _show(names: Sequence[str]) -> str:
    return show_some(names, _MAX_LISTED, quote=True)


class ReIDDataset:
    """Base class: holds the three splits, relabels training ids and formats a summary.

    Subclasses parse their files into raw ``(path, pid, camid)`` records and call
    :meth:`_finalize`. ``distractor_pid`` (when not ``None``) is an identity allowed only in the
    gallery and query (Market-1501's ``0000`` distractors); finding it in the training split
    is an error.
    """

    name: str = "ReID"
    distractor_pid: int | None = None

    train: list[ReIDRecord]
    query: list[ReIDRecord]
    gallery: list[ReIDRecord]
    train_pid_map: dict[int, int]
    """Original training identity -> training label (``0..num_train_pids-1``)."""

    def _finalize(
        self,
        train: list[ReIDRecord],
        query: list[ReIDRecord],
        gallery: list[ReIDRecord],
    ) -> None:
        if self.distractor_pid is not None:
            bad = [r.path for r in train if r.pid == self.distractor_pid]
            if bad:
                raise ValueError(
                    f"{self.name}: the training split holds {len(bad)} distractor images "
                    f"(identity {self.distractor_pid}), which belong in the gallery only: "
                    f"{_show([os.path.basename(p) for p in bad])}"
                )
        self.train_pid_map = {pid: i for i, pid in enumerate(sorted({r.pid for r in train}))}
        self.train = [r._replace(pid=self.train_pid_map[r.pid]) for r in train]
        self.query = query
        self.gallery = gallery

    @property
    def num_train_pids(self) -> int:
        """Number of training identities (the classifier's output size)."""
        return len(self.train_pid_map)

    @property
    def num_train_cams(self) -> int:
        """Number of distinct cameras in the training split."""
        return len({r.camid for r in self.train})

    @property
    def num_train_images(self) -> int:
        """Number of training images."""
        return len(self.train)

    def summary(self) -> str:
        """A small table of identities, images and cameras per split."""
        rows = [("train", self.train), ("query", self.query), ("gallery", self.gallery)]
        lines = [
            f"{self.name} dataset",
            f"  {'split':<8} {'ids':>7} {'images':>8} {'cameras':>8}",
        ]
        for split, records in rows:
            ids = len({r.pid for r in records})
            cams = len({r.camid for r in records})
            lines.append(f"  {split:<8} {ids:>7} {len(records):>8} {cams:>8}")
        return "\n".join(lines)

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(train={len(self.train)}, query={len(self.query)}, "
            f"gallery={len(self.gallery)}, num_train_pids={self.num_train_pids})"
        )


def _resolve_root(
    root: str | os.PathLike[str],
    required: Sequence[str],
    wrappers: Sequence[str],
    *,
    name: str,
    layout: str,
) -> Path:
    """Return ``root`` or ``root/<wrapper>``, whichever contains every entry of ``required``."""
    base = Path(root).expanduser()
    if not base.is_dir():
        raise FileNotFoundError(
            f"{name}: dataset root {str(base)!r} does not exist or is not a folder.\n"
            f"Expected layout:\n{layout}"
        )
    for candidate in (base, *(base / w for w in wrappers)):
        if all((candidate / r).exists() for r in required):
            return candidate
    missing = [r for r in required if not (base / r).exists()]
    raise FileNotFoundError(
        f"{name}: {str(base)!r} is missing {', '.join(repr(m) for m in missing)} "
        f"(also looked inside {', '.join(repr(w) for w in wrappers) or 'no sub-folder'}).\n"
        f"Expected layout:\n{layout}"
    )


class _NotAnInteger(ValueError):
    """A file name matched the pattern, but a captured pid or camid is not an integer."""


def _scan_folder(
    folder: Path,
    parser: NameParser,
    *,
    name: str,
    split: str,
    camid_base: int,
) -> list[ReIDRecord]:
    """Parse every image file of ``folder`` (sorted by name); drop junk, refuse the rest."""
    records: list[ReIDRecord] = []
    unparsed: list[str] = []
    bad_ids: list[str] = []
    not_integers: list[str] = []
    subfolders: list[str] = []
    junk = 0
    for entry in sorted(os.scandir(folder), key=lambda e: e.name):
        if entry.is_dir():
            subfolders.append(entry.name)
            continue
        if Path(entry.name).suffix.lower() not in IMAGE_EXTENSIONS:
            continue
        path = os.path.join(folder, entry.name)
        if not entry.is_file():  # a dangling symbolic link, a socket, ...
            kind = "a link to a missing file" if entry.is_symlink() else "not a regular file"
            raise FileNotFoundError(f"{name}: {path!r} in the {split} split is {kind}")
        if not os.access(path, os.R_OK):
            raise PermissionError(f"{name}: {path!r} in the {split} split is not readable")
        try:
            parsed = parser(entry.name)
        except _NotAnInteger as err:
            not_integers.append(str(err))
            continue
        except ValueError:
            parsed = None
        if parsed is None:
            unparsed.append(entry.name)
            continue
        pid, cam = parsed
        if pid == JUNK_PID:
            junk += 1
            continue
        camid = cam - camid_base
        if pid < 0 or camid < 0:
            bad_ids.append(f"{entry.name!r} (pid {pid}, camera {cam})")
            continue
        records.append(ReIDRecord(path, pid, camid))
    if not_integers:
        raise ValueError(
            f"{name}: {len(not_integers)} file names in the {split} split ({str(folder)!r}) match "
            "the pattern, but a captured pid or camid is not an integer: "
            f"{show_some(not_integers, _MAX_LISTED)}"
            r"; the groups must capture digits only, e.g. (?P<pid>\d+) and (?P<camid>\d+)"
        )
    if unparsed:
        raise ValueError(
            f"{name}: {len(unparsed)} file names in the {split} split ({str(folder)!r}) do not "
            f"match the expected naming: {_show(unparsed)}"
        )
    if bad_ids:
        raise ValueError(
            f"{name}: {len(bad_ids)} file names in the {split} split ({str(folder)!r}) give an "
            f"identity below -1 or a camera below the first camera number {camid_base}: "
            f"{show_some(bad_ids, _MAX_LISTED)}"
        )
    if not records:
        extra = f" ({junk} junk images with identity -1 were dropped)" if junk else ""
        if subfolders:
            extra += (
                f"; it has sub-folders ({_show(subfolders)}), but images are read from the "
                "split folder itself, not from sub-folders"
            )
        raise ValueError(f"{name}: the {split} split ({str(folder)!r}) has no images{extra}.")
    return records


def _regex_parser(pattern: str | re.Pattern[str]) -> NameParser:
    if not isinstance(pattern, (str, re.Pattern)):
        raise TypeError(f"pattern must be a string or re.Pattern, got {type(pattern).__name__}")
    try:
        regex = re.compile(pattern)
    except re.error as err:
        raise ValueError(f"pattern {pattern!r} is not a regular expression: {err}") from None
    if not {"pid", "camid"} <= set(regex.groupindex):
        raise ValueError(
            f"pattern {regex.pattern!r} must have named groups 'pid' and 'camid', "
            f"e.g. r'(?P<pid>-?\\d+)_c(?P<camid>\\d+)'"
        )

    def parse(file_name: str) -> tuple[int, int] | None:
        match = regex.fullmatch(file_name)
        if match is None:
            return None
        values: list[int] = []
        for group in ("pid", "camid"):
            text = match.group(group)
            try:
                values.append(int(text))
            except (TypeError, ValueError):  # TypeError: the group took no part in the match
                shown = "nothing" if text is None else repr(text)
                raise _NotAnInteger(f"{file_name!r} ({group} captured {shown})") from None
        return values[0], values[1]

    return parse


class _SplitFolderDataset(ReIDDataset):
    """Three image folders (train, query, gallery) whose file names carry pid and camera."""

    pattern: str = ""
    dirs: tuple[str, str, str] = ("bounding_box_train", "query", "bounding_box_test")
    wrappers: tuple[str, ...] = ()
    example: str = ""
    camid_base: int = 1

    def __init__(self, root: str | os.PathLike[str]) -> None:
        self.root = self._resolve(root)
        self._load(_regex_parser(self.pattern))

    def _resolve(self, root: str | os.PathLike[str]) -> Path:
        return _resolve_root(root, self.dirs, self.wrappers, name=self.name, layout=self.layout())

    def layout(self) -> str:
        """The folder layout this dataset expects, for error messages."""
        head = "  <root>/" + (
            f"   (or <root>/{self.wrappers[0]}/, as unzipped)" if self.wrappers else ""
        )
        train, query, gallery = self.dirs
        return "\n".join(
            [
                head,
                f"    {train}/   e.g. {self.example}",
                f"    {query}/",
                f"    {gallery}/",
            ]
        )

    def _load(self, parser: NameParser) -> None:
        train, query, gallery = (
            _scan_folder(
                self.root / folder, parser, name=self.name, split=split, camid_base=self.camid_base
            )
            for folder, split in zip(self.dirs, ("train", "query", "gallery"), strict=True)
        )
        self._finalize(train, query, gallery)


class Market1501(_SplitFolderDataset):
    """Market-1501 (Zheng et al., ICCV 2015): 751 training and 750 test identities, 6 cameras.

    ``root`` is the folder holding ``bounding_box_train``, ``query`` and ``bounding_box_test``,
    or its parent holding ``Market-1501-v15.09.15``. Names look like ``0002_c1s1_000451_03.jpg``
    (identity 2, camera 1 -> camid 0). Identity ``-1`` is junk (dropped); identity ``0``
    (distractors) stays in the gallery.
    """

    name = "Market-1501"
    pattern = r"(?P<pid>-1|\d+)_c(?P<camid>\d)s\d_\d+_\d+\.jpg"
    wrappers: tuple[str, ...] = ("Market-1501-v15.09.15", "Market-1501")
    example = "0002_c1s1_000451_03.jpg"
    distractor_pid = 0


class DukeMTMCreID(_SplitFolderDataset):
    """DukeMTMC-reID: 702 training and 1110 test identities (incl. distractors), 8 cameras.

    ``root`` holds ``bounding_box_train``, ``query``, ``bounding_box_test`` (or is the parent of
    ``DukeMTMC-reID``). Names look like ``0001_c2_f0046182.jpg``.
    """

    name = "DukeMTMC-reID"
    pattern = r"(?P<pid>-1|\d+)_c(?P<camid>\d)_f\d+\.jpg"
    wrappers = ("DukeMTMC-reID",)
    example = "0001_c2_f0046182.jpg"


class CUHK03NP(_SplitFolderDataset):
    """CUHK03 under the new protocol (767 training / 700 test identities, 2 cameras).

    ``root`` is the ``cuhk03-np`` folder (holding ``detected/`` and ``labeled/``, each with
    ``bounding_box_train``, ``query``, ``bounding_box_test``) or its parent. ``split`` picks the
    detected or the hand-labelled boxes. Names look like ``0001_c1_1.png`` (camera 1 or 2).
    """

    name = "CUHK03-NP"
    pattern = r"(?P<pid>-1|\d+)_c(?P<camid>[12])_\d+\.png"
    wrappers = ("cuhk03-np",)
    example = "0001_c1_1.png"

    def __init__(self, root: str | os.PathLike[str], split: str = "detected") -> None:
        if split not in ("detected", "labeled"):
            raise ValueError(f"CUHK03NP: split must be 'detected' or 'labeled', got {split!r}")
        self.split = split
        self.name = f"CUHK03-NP ({split})"
        train, query, gallery = type(self).dirs
        self.dirs = (f"{split}/{train}", f"{split}/{query}", f"{split}/{gallery}")
        super().__init__(root)


class ReIDFolder(_SplitFolderDataset):
    """A generic re-ID dataset: three folders whose file names carry identity and camera.

    Give either ``pattern``, a regular expression with named groups ``pid`` and ``camid`` that
    must match the whole file name, or ``parser``, a callable ``name -> (pid, camid)`` that
    returns ``None`` (or raises ``ValueError``) for names it cannot parse. ``camid_base`` is the
    camera number the names use for the first camera (subtracted from the parsed camera, so
    records are 0-based). Identity ``-1`` is treated as junk and dropped.
    """

    name = "ReIDFolder"

    def __init__(
        self,
        root: str | os.PathLike[str],
        *,
        train_dir: str,
        query_dir: str,
        gallery_dir: str,
        pattern: str | re.Pattern[str] | None = None,
        parser: NameParser | None = None,
        camid_base: int = 1,
        name: str = "ReIDFolder",
    ) -> None:
        if (pattern is None) == (parser is None):
            raise ValueError("ReIDFolder: give exactly one of `pattern` or `parser`")
        for value, what in ((train_dir, "train_dir"), (query_dir, "query_dir"),
                            (gallery_dir, "gallery_dir"), (name, "name")):  # fmt: skip
            if not isinstance(value, str):
                raise TypeError(f"ReIDFolder: {what} must be a string, got {value!r}")
        check_nonnegative_int(camid_base, "ReIDFolder: camid_base")
        self.name = name
        self.dirs = (train_dir, query_dir, gallery_dir)
        self.camid_base = camid_base
        self.example = "<file names matching your pattern or parser>"
        self.root = self._resolve(root)
        self._load(parser if parser is not None else _regex_parser(pattern))  # type: ignore[arg-type]


_MSMT_NAME = re.compile(r"(?P<pid>\d+)_\d+_(?P<camid>\d+)_")


class MSMT17(ReIDDataset):
    """MSMT17 (Wei et al., CVPR 2018): 1041 training and 3060 test identities, 15 cameras.

    ``root`` holds the list files ``list_train.txt``, ``list_val.txt``, ``list_query.txt``,
    ``list_gallery.txt`` and the image folders ``train/`` and ``test/`` (V1) or
    ``mask_train_v2/`` and ``mask_test_v2/`` (V2); the parent of ``MSMT17_V1``/``MSMT17_V2``
    is accepted too. List lines are ``relative/path.jpg pid``, paths relative to the train
    folder (train and val lists) or the test folder (query and gallery lists). The camera comes
    from the file name (``0000_000_01_0303morning_0015_0.jpg`` -> camera 1 -> camid 0). Train
    and val are merged for training, as is standard.
    """

    name = "MSMT17"
    _lists = ("list_train.txt", "list_val.txt", "list_query.txt", "list_gallery.txt")
    _folders = (("train", "test"), ("mask_train_v2", "mask_test_v2"))
    _layout = "\n".join(
        [
            "  <root>/   (or <root>/MSMT17_V1/ or <root>/MSMT17_V2/)",
            "    list_train.txt list_val.txt list_query.txt list_gallery.txt",
            "        lines: 0000/0000_000_01_0303morning_0015_0.jpg 0",
            "    train/ and test/                 (V1)",
            "    mask_train_v2/ and mask_test_v2/ (V2)",
        ]
    )

    def __init__(self, root: str | os.PathLike[str]) -> None:
        self.root = _resolve_root(
            root,
            self._lists,
            ("MSMT17_V1", "MSMT17_V2", "MSMT17"),
            name=self.name,
            layout=self._layout,
        )
        for train_folder, test_folder in self._folders:
            if (self.root / train_folder).is_dir() and (self.root / test_folder).is_dir():
                self.version = "V1" if train_folder == "train" else "V2"
                break
        else:
            raise FileNotFoundError(
                f"{self.name}: {str(self.root)!r} has the list files but neither 'train/' and "
                f"'test/' (V1) nor 'mask_train_v2/' and 'mask_test_v2/' (V2).\n"
                f"Expected layout:\n{self._layout}"
            )
        train_dir, test_dir = self.root / train_folder, self.root / test_folder
        lists = [self.root / name for name in self._lists]
        train = self._read_list(lists[0], train_dir, "train") + self._read_list(
            lists[1], train_dir, "val", allow_empty=True
        )
        self._finalize(
            train,
            self._read_list(lists[2], test_dir, "query"),
            self._read_list(lists[3], test_dir, "gallery"),
        )

    def _read_list(
        self, list_file: Path, image_dir: Path, split: str, *, allow_empty: bool = False
    ) -> list[ReIDRecord]:
        records: list[ReIDRecord] = []
        malformed: list[str] = []
        missing: list[str] = []
        with open(list_file, encoding="utf-8") as f:
            for line_no, line in enumerate(f, start=1):
                fields = line.split()
                if not fields:
                    continue
                if len(fields) != 2 or not re.fullmatch(r"-?\d+", fields[1]):
                    malformed.append(f"line {line_no}: {line.strip()!r}")
                    continue
                rel, pid_text = fields
                match = _MSMT_NAME.match(os.path.basename(rel))
                if match is None or int(match.group("camid")) < 1:
                    malformed.append(f"line {line_no}: {line.strip()!r}")
                    continue
                path = image_dir / rel
                if not path.is_file():
                    missing.append(str(path))
                    continue
                records.append(ReIDRecord(str(path), int(pid_text), int(match.group("camid")) - 1))
        if malformed:
            raise ValueError(
                f"{self.name}: {len(malformed)} lines of {str(list_file)!r} are not "
                f"'<relative/path/PPPP_NNN_CC_....jpg> <pid>': {_show(malformed)}"
            )
        if missing:
            raise FileNotFoundError(
                f"{self.name}: {len(missing)} images listed in {str(list_file)!r} do not exist "
                f"under {str(image_dir)!r}: {_show(missing)}"
            )
        if not records and not allow_empty:
            raise ValueError(f"{self.name}: the {split} list {str(list_file)!r} has no images.")
        return records


class ImageDataset(Dataset[tuple[torch.Tensor, int, int]]):
    """A ``torch`` dataset over records, returning ``(image_tensor, pid, camid)``.

    Images are opened with PIL and converted to RGB; ``transform`` maps the PIL image to a
    tensor (``None``: ``to_tensor``, float in [0, 1], shape (3, H, W)). An unreadable or
    corrupt image raises ``OSError`` naming the file; nothing is skipped.
    """

    def __init__(
        self,
        records: Iterable[ReIDRecord | tuple[str, int, int]],
        transform: Callable[[Image.Image], torch.Tensor] | None = None,
    ) -> None:
        self.records = [ReIDRecord(*r) for r in records]
        self.transform = transform

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int, int]:
        path, pid, camid = self.records[index]
        image = read_image(path)
        tensor = self.transform(image) if self.transform is not None else tvf.to_tensor(image)
        return tensor, pid, camid


_EXIF_ORIENTATION = 0x0112


def _to_8bit(img: Image.Image, path: str | os.PathLike[str]) -> Image.Image:
    """High-bit-depth grayscale (16-bit PNG: mode ``I;16``; ``I`` holding 0..65535) scaled to
    8 bits as ``round(v * 255 / 65535)``; other modes unchanged; float pixels refused."""
    if img.mode.startswith("I;16") or img.mode == "I":
        values = np.asarray(img).astype(np.int64)
        if values.size and (values.min() < 0 or values.max() > 65535):
            raise OSError(
                f"cannot read image {os.fspath(path)!r}: 32-bit integer pixels (mode 'I') "
                f"range {values.min()}..{values.max()}, not 16-bit 0..65535; save it as 8-bit"
            )
        return Image.fromarray(((values + 128) // 257).astype(np.uint8), mode="L")
    if img.mode == "F":
        raise OSError(
            f"cannot read image {os.fspath(path)!r}: floating-point pixels (mode 'F') have "
            "no known range; save it as an 8-bit or 16-bit image"
        )
    return img


def read_image(path: str | os.PathLike[str]) -> Image.Image:
    """Open an image fully decoded as 8-bit RGB, upright; ``OSError`` naming the file when it
    cannot be read.

    - An EXIF orientation tag (photos from phones and cameras) is applied, so a crop is read
      the way image viewers show it; files without one (re-ID crops normally) are unchanged.
    - 16-bit grayscale (PNG ``I;16``, or ``I`` with values 0..65535) is scaled to 8 bits,
      ``round(v * 255 / 65535)``, not clipped; 16-bit RGB PNGs are reduced to 8 bits by
      Pillow itself. Floating-point images (mode ``F``) and ``I`` images outside 0..65535
      have no known range and are refused with an ``OSError``.
    - Grayscale, palette, CMYK and alpha images are converted to RGB (alpha dropped).
    """
    try:
        with Image.open(path) as img:
            upright = img
            if img.getexif().get(_EXIF_ORIENTATION, 1) != 1:
                upright = ImageOps.exif_transpose(img)
            rgb: Image.Image = _to_8bit(upright, path).convert("RGB")
    except (OSError, SyntaxError, ValueError) as exc:
        if str(exc).startswith("cannot read image "):
            raise
        raise OSError(f"cannot read image {os.fspath(path)!r}: {exc}") from exc
    return rgb


class _SyntheticMarket(Market1501):
    """The synthetic dataset: a Market-1501-format folder, parsed by :class:`Market1501`."""

    name = "Synthetic (Market-1501 format)"
    wrappers = ()

    def layout(self) -> str:
        return (
            super().layout()
            + "\n  (write it with lagnet.data.generate_synthetic_market(root) first)"
        )


_REGISTRY: dict[str, Callable[[str | os.PathLike[str]], ReIDDataset]] = {
    "market1501": Market1501,
    "dukemtmcreid": DukeMTMCreID,
    "cuhk03np-detected": lambda root: CUHK03NP(root, split="detected"),
    "cuhk03np-labeled": lambda root: CUHK03NP(root, split="labeled"),
    "msmt17": MSMT17,
    "synthetic": lambda root: _SyntheticMarket(root),
}

DATASET_NAMES: tuple[str, ...] = tuple(_REGISTRY)
"""Names accepted by :func:`build_dataset`."""


def build_dataset(name: str, root: str | os.PathLike[str]) -> ReIDDataset:
    """Build a dataset by registry name (see :data:`DATASET_NAMES`) from its root folder.

    ``"synthetic"`` loads a folder written by
    :func:`lagnet.data.synthetic.generate_synthetic_market` with the Market-1501 parser.
    """
    key = name.lower()
    if key not in _REGISTRY:
        raise ValueError(f"unknown dataset {name!r}; choose one of {', '.join(DATASET_NAMES)}")
    return _REGISTRY[key](root)
