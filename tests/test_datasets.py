"""Dataset loading: every CoOp layout of the paper's protocol (fake folders of tiny images), the
ImageNet variants' class subsets, ImageFolder trees, one-line errors, listing fingerprints.

The expected folder and file names, class orders and labels are written out by hand from CoOp's
DATASETS.md and datasets/*.py, not taken from the tables of pini.data.
"""

import hashlib
import importlib
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from pini.data.digits import load_digits_split
from pini.data.image_list import ImageList
from pini.data.load import load_dataset
from pini.data.names import DATASET_ALIASES, DATASET_NAMES, canonical_name
from pini.data.sample_ids import listing_fingerprint, sample_id
from pini.data.split import DatasetNotFoundError, Split
from pini.errors import InputError
from pini.prompts import TEMPLATES, ZERO_SHOT_TEMPLATES, template_for, zero_shot_template


def _image(path, color=(200, 30, 90)):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (8, 8), color).save(path)


# --- CoOp split files -------------------------------------------------------------------------

# (folder, split file, image folder, [(relative path of one image per class, class name)] by
# label): CoOp's DATASETS.md and datasets/*.py.
SPLIT_FILE_DATASETS = [
    (
        "caltech-101",
        "split_zhou_Caltech101.json",
        "101_ObjectCategories",
        [
            ("airplanes/image_{}.jpg", "airplane"),
            ("Faces/image_{}.jpg", "face"),
            ("accordion/image_{}.jpg", "accordion"),
        ],
    ),
    (
        "oxford_pets",
        "split_zhou_OxfordPets.json",
        "images",
        [
            ("Abyssinian_{}.jpg", "abyssinian"),
            ("beagle_{}.jpg", "beagle"),
            ("american_bulldog_{}.jpg", "american_bulldog"),
        ],
    ),
    (
        "stanford_cars",
        "split_zhou_StanfordCars.json",
        "",
        [
            ("cars_train/0000{}.jpg", "2012 AM General Hummer SUV"),
            ("cars_train/0010{}.jpg", "2012 Acura RL Sedan"),
            ("cars_test/0020{}.jpg", "2007 BMW X5 SUV"),
        ],
    ),
    (
        "oxford_flowers",
        "split_zhou_OxfordFlowers.json",
        "jpg",
        [
            ("image_0000{}.jpg", "pink primrose"),
            ("image_0010{}.jpg", "hard-leaved pocket orchid"),
            ("image_0020{}.jpg", "canterbury bells"),
        ],
    ),
    (
        "food-101",
        "split_zhou_Food101.json",
        "images",
        [
            ("apple_pie/10{}.jpg", "apple_pie"),
            ("baby_back_ribs/20{}.jpg", "baby_back_ribs"),
            ("baklava/30{}.jpg", "baklava"),
        ],
    ),
    (
        "sun397",
        "split_zhou_SUN397.json",
        "SUN397",
        [
            ("a/abbey/sun_{}.jpg", "abbey"),
            ("a/airplane_cabin/sun_{}.jpg", "airplane cabin"),
            ("a/apartment_building/outdoor/sun_{}.jpg", "outdoor apartment building"),
        ],
    ),
    (
        "dtd",
        "split_zhou_DescribableTextures.json",
        "images",
        [
            ("banded/banded_{}.jpg", "banded"),
            ("blotchy/blotchy_{}.jpg", "blotchy"),
            ("braided/braided_{}.jpg", "braided"),
        ],
    ),
    (
        "eurosat",
        "split_zhou_EuroSAT.json",
        "2750",
        [
            ("AnnualCrop/AnnualCrop_{}.jpg", "Annual Crop Land"),
            ("Forest/Forest_{}.jpg", "Forest"),
            ("HerbaceousVegetation/HerbaceousVegetation_{}.jpg", "Herbaceous Vegetation Land"),
        ],
    ),
    (
        "ucf101",
        "split_zhou_UCF101.json",
        "UCF-101-midframes",
        [
            ("Apply_Eye_Makeup/v_ApplyEyeMakeup_g0{}_c01.jpg", "Apply_Eye_Makeup"),
            ("Apply_Lipstick/v_ApplyLipstick_g0{}_c01.jpg", "Apply_Lipstick"),
            ("Archery/v_Archery_g0{}_c01.jpg", "Archery"),
        ],
    ),
]


def _split_file_dataset(root, folder, split_file, image_folder, classes, entries=None):
    """CoOp's layout: per class, images 1-2 train, 3 val, 4 test; "train" written with the last
    label first, so class order must come from the labels, not from the file's order."""
    dataset = root / folder
    if entries is None:
        entries = {"train": [], "val": [], "test": []}
        for label, (pattern, classname) in reversed(list(enumerate(classes))):
            for number, part in ((1, "train"), (2, "train"), (3, "val"), (4, "test")):
                entries[part].append([pattern.format(number), label, classname])
    for part_entries in entries.values():
        for relative, label, _ in part_entries:
            _image(dataset / image_folder / relative, (40 * label, 90, 30))
    dataset.mkdir(parents=True, exist_ok=True)
    (dataset / split_file).write_text(json.dumps(entries))
    return dataset


@pytest.mark.parametrize(
    "folder, split_file, image_folder, classes", SPLIT_FILE_DATASETS, ids=lambda v: str(v)[:14]
)
def test_split_file_layouts_load_with_coop_classes_and_name(
    tmp_path, folder, split_file, image_folder, classes
):
    dataset = _split_file_dataset(tmp_path, folder, split_file, image_folder, classes)
    split = load_dataset(tmp_path, folder)
    assert split.name == folder
    assert split.classnames == [classname for _, classname in classes]
    assert split.class_subset is None and split.directory == str(dataset.absolute())
    image_dir = dataset.absolute() / image_folder
    assert split.train == [
        (str(image_dir / pattern.format(number)), label)
        for label in (2, 1, 0)
        for number in (1, 2)
        for pattern in [classes[label][0]]
    ]
    assert split.val == [
        (str(image_dir / classes[label][0].format(3)), label) for label in (2, 1, 0)
    ]
    assert split.test == [
        (str(image_dir / classes[label][0].format(4)), label) for label in (2, 1, 0)
    ]


def test_caltech_classes_are_the_split_files_background_left_out(tmp_path):
    """CoOp's split file leaves out BACKGROUND_Google and Faces_easy and renames airplanes ->
    airplane; the folders on disk do not add classes."""
    folder, split_file, image_folder, classes = SPLIT_FILE_DATASETS[0]
    dataset = _split_file_dataset(tmp_path, folder, split_file, image_folder, classes)
    _image(dataset / image_folder / "BACKGROUND_Google" / "image_0001.jpg")
    _image(dataset / image_folder / "Faces_easy" / "image_0001.jpg")
    split = load_dataset(dataset, None)
    assert split.classnames == ["airplane", "face", "accordion"]
    paths = [path for path, _ in split.train + split.val + split.test]
    assert len(paths) == 12 and not any("BACKGROUND" in p or "Faces_easy" in p for p in paths)


@pytest.mark.parametrize(
    "alias, folder",
    [
        ("flowers102", "oxford_flowers"),
        ("OxfordFlowers", "oxford_flowers"),
        ("food101", "food-101"),
        ("Food101", "food-101"),
        ("caltech101", "caltech-101"),
        ("DescribableTextures", "dtd"),
        ("OxfordPets", "oxford_pets"),
        ("StanfordCars", "stanford_cars"),
        ("FGVCAircraft", "fgvc_aircraft"),
        ("SUN397", "sun397"),
        ("EuroSAT", "eurosat"),
        ("UCF101", "ucf101"),
        ("ImageNet", "imagenet"),
        ("imagenet_v2", "imagenetv2"),
        ("ImageNetV2", "imagenetv2"),
        ("imagenet_sketch", "imagenet-sketch"),
        ("ImageNet-A", "imagenet-adversarial"),
        ("imagenet_a", "imagenet-adversarial"),
        ("ImageNet-R", "imagenet-rendition"),
        ("imagenet_r", "imagenet-rendition"),
        ("my_birds", None),
        ("pets", None),
    ],
)
def test_aliases_map_to_coops_folder_names(alias, folder):
    assert canonical_name(alias) == folder


def test_alias_finds_the_folder_and_the_folder_may_carry_an_alias(tmp_path):
    flowers = SPLIT_FILE_DATASETS[3]
    _split_file_dataset(tmp_path / "a", *flowers)
    assert load_dataset(tmp_path / "a", "flowers102").name == "oxford_flowers"
    renamed = _split_file_dataset(tmp_path / "b", "flowers102", *flowers[1:])
    split = load_dataset(tmp_path / "b", "oxford_flowers")
    assert split.name == "oxford_flowers" and split.directory == str(renamed.absolute())
    assert split.classnames[0] == "pink primrose"


def test_root_may_be_the_dataset_folder_itself(tmp_path):
    dataset = _split_file_dataset(tmp_path, *SPLIT_FILE_DATASETS[1])
    for name in (None, "oxford_pets", "OxfordPets"):
        split = load_dataset(dataset, name)
        assert split.name == "oxford_pets" and len(split.train) == 6, name


def test_a_split_file_found_in_an_unknown_folder_names_the_dataset(tmp_path):
    _split_file_dataset(tmp_path, "my_copy", *SPLIT_FILE_DATASETS[6][1:])  # dtd's split file
    split = load_dataset(tmp_path, "my_copy")
    assert split.name == "dtd" and split.classnames == ["banded", "blotchy", "braided"]


def test_an_unknown_split_file_finds_its_images_from_the_first_entry(tmp_path):
    entries = {"train": [["x/0.jpg", 1, "wolf"], ["y/0.jpg", 0, "fox"]], "test": []}
    dataset = _split_file_dataset(tmp_path, "custom", "split_zhou_Custom.json", "imgs", [], entries)
    split = load_dataset(tmp_path, "custom")
    assert split.name == "custom" and split.classnames == ["fox", "wolf"] and split.val == []
    assert split.train == [
        (str(dataset.absolute() / "imgs/x/0.jpg"), 1),
        (str(dataset.absolute() / "imgs/y/0.jpg"), 0),
    ]


def test_a_protocol_name_on_an_image_folder_tree_keeps_the_name(tmp_path):
    """A user's own DTD as train/<class>/ and test/<class>/: a tree, named dtd (its template)."""
    for part in ("train", "test"):
        _image(tmp_path / "dtd" / part / "banded" / "0.jpg")
    split = load_dataset(tmp_path, "DTD")
    assert split.name == "dtd" and split.classnames == ["banded"] and len(split.test) == 1


# --- FGVC-Aircraft ----------------------------------------------------------------------------


def test_fgvc_aircraft_reads_variants_and_image_lists(tmp_path):
    dataset = tmp_path / "fgvc_aircraft"
    dataset.mkdir()
    (dataset / "variants.txt").write_text("A300B4\n707-320\nF/A-18\n")  # not sorted: file order
    lines = {
        "train": "1025794 707-320\n1340192 F/A-18\n0056978 A300B4\n1000001 707-320\n",
        "val": "2000001 F/A-18\n",
        "test": "3000001 A300B4\n3000002 F/A-18\n",
    }
    for part, text in lines.items():
        (dataset / f"images_variant_{part}.txt").write_text(text)
        for line in text.splitlines():
            _image(dataset / "images" / f"{line.split(' ')[0]}.jpg")
    split = load_dataset(tmp_path, "fgvc_aircraft")
    assert split.name == "fgvc_aircraft" and split.classnames == ["A300B4", "707-320", "F/A-18"]
    images = dataset.absolute() / "images"
    assert split.train == [
        (str(images / "1025794.jpg"), 1),
        (str(images / "1340192.jpg"), 2),
        (str(images / "0056978.jpg"), 0),
        (str(images / "1000001.jpg"), 1),
    ]
    assert split.val == [(str(images / "2000001.jpg"), 2)]
    assert [label for _, label in split.test] == [0, 2]


# --- ImageNet and its variants ----------------------------------------------------------------

# Written out of wnid order: the labels follow sorted wnids (CoOp labels its sorted folders).
CLASSNAMES_TXT = "n02084071 dog\nn01440764 tench\nn01491361 great white shark\nn01443537 goldfish\n"
IMAGENET_WNIDS = ["n01440764", "n01443537", "n01491361", "n02084071"]
IMAGENET_NAMES = ["tench", "goldfish", "great white shark", "dog"]


def _imagenet_like(root, folder, image_folder, class_folders, per_class=2):
    dataset = root / folder
    dataset.mkdir(parents=True)
    (dataset / "classnames.txt").write_text(CLASSNAMES_TXT)
    for class_folder in class_folders:
        (dataset / image_folder / class_folder).mkdir(parents=True)
        for number in range(per_class):
            _image(dataset / image_folder / class_folder / f"img_{number}.JPEG")
    return dataset


def test_imagenet_layout_val_is_the_test_set(tmp_path):
    dataset = _imagenet_like(tmp_path, "imagenet", "images/train", IMAGENET_WNIDS)
    for wnid in IMAGENET_WNIDS:
        _image(dataset / "images" / "val" / wnid / "val_0.JPEG")
    split = load_dataset(tmp_path, "imagenet")
    assert split.name == "imagenet" and split.classnames == IMAGENET_NAMES
    assert split.class_subset is None and split.val == []
    assert [label for _, label in split.train] == [0, 0, 1, 1, 2, 2, 3, 3]
    assert split.train[2][0] == str(dataset.absolute() / "images/train/n01443537/img_0.JPEG")
    assert split.test == [
        (str(dataset.absolute() / "images" / "val" / wnid / "val_0.JPEG"), label)
        for label, wnid in enumerate(IMAGENET_WNIDS)
    ]


def test_imagenetv2_numbered_folders_are_imagenet_labels(tmp_path):
    dataset = _imagenet_like(
        tmp_path, "imagenetv2", "imagenetv2-matched-frequency-format-val", ["0", "1", "2", "3"], 1
    )
    split = load_dataset(tmp_path, "imagenetv2")
    assert split.name == "imagenetv2" and split.classnames == IMAGENET_NAMES
    assert split.train == [] and split.class_subset is None
    folder = dataset.absolute() / "imagenetv2-matched-frequency-format-val"
    assert split.test == [(str(folder / str(label) / "img_0.JPEG"), label) for label in range(4)]


def test_imagenet_sketch_loads_its_images(tmp_path):
    """Before: 0 images and 0% with exit status 0."""
    _imagenet_like(tmp_path, "imagenet-sketch", "images", IMAGENET_WNIDS)
    split = load_dataset(tmp_path, "imagenet-sketch")
    assert split.name == "imagenet-sketch" and split.classnames == IMAGENET_NAMES
    assert [label for _, label in split.test] == [0, 0, 1, 1, 2, 2, 3, 3]
    assert split.class_subset is None and split.train == []


@pytest.mark.parametrize(
    "folder, alias, image_folder, wnids, subset",
    [
        ("imagenet-adversarial", "ImageNet-A", "imagenet-a", ["n02084071", "n01443537"], [1, 3]),
        ("imagenet-rendition", "imagenet_r", "imagenet-r", ["n01491361", "n01440764"], [0, 2]),
    ],
)
def test_imagenet_a_and_r_map_to_their_imagenet_classes(
    tmp_path, folder, alias, image_folder, wnids, subset
):
    dataset = _imagenet_like(tmp_path, folder, image_folder, wnids)
    (dataset / image_folder / "README.txt").write_text("not a class")
    split = load_dataset(tmp_path, alias)
    assert split.name == folder and split.classnames == IMAGENET_NAMES  # the full list
    assert split.class_subset == subset
    assert [label for _, label in split.test] == [subset[0]] * 2 + [subset[1]] * 2
    assert all(f"/{IMAGENET_WNIDS[label]}/" in path for path, label in split.test)
    with pytest.raises(InputError, match=f"{folder} .* has no training images; .*test-only"):
        split.require("train")
    split.require("test")


# --- ImageFolder trees ------------------------------------------------------------------------


def test_unknown_folder_is_an_image_folder_tree_named_after_itself(tmp_path, monkeypatch):
    dataset = tmp_path / "my_birds"
    for part, count in (("train", 2), ("val", 1)):
        for label, bird in enumerate(["blue_jay", "robin"]):
            for number in range(count):
                _image(dataset / part / bird / f"{number}.png", (label * 90, 10, 10))
    split = load_dataset(tmp_path, "my_birds")
    assert split.name == "my_birds" and split.classnames == ["blue jay", "robin"]
    assert [label for _, label in split.train] == [0, 0, 1, 1]
    assert split.test == [
        (str(dataset.absolute() / "val" / bird / "0.png"), label)
        for label, bird in enumerate(["blue_jay", "robin"])
    ]
    monkeypatch.chdir(dataset)
    assert load_dataset(".", None).name == "my_birds"  # `--root .`: the resolved folder's name


def test_a_folder_of_class_folders_without_train_or_test_is_refused(tmp_path):
    _image(tmp_path / "flat" / "cat" / "0.png")
    with pytest.raises(InputError, match=r"flat has no train/, test/ or val/ folder; expected"):
        load_dataset(tmp_path, "flat")


def test_empty_class_folder_warns_naming_it_and_stays_a_class(tmp_path, caplog):
    dataset = tmp_path / "tree"
    _image(dataset / "train" / "apple" / "0.png")
    (dataset / "train" / "pear").mkdir()
    _image(dataset / "test" / "apple" / "0.png")
    _image(dataset / "test" / "pear" / "0.png")
    split = load_dataset(dataset, None)
    assert split.classnames == ["apple", "pear"] and [y for _, y in split.train] == [0]
    assert [y for _, y in split.test] == [0, 1]
    assert f"1 empty class folder in {dataset.absolute() / 'train'}" in caplog.text
    assert "pear" in caplog.text


def test_split_require_names_the_missing_part(tmp_path):
    _image(tmp_path / "only_train" / "train" / "a" / "0.png")
    split = load_dataset(tmp_path, "only_train")
    split.require("train")
    with pytest.raises(InputError, match=r"dataset only_train \(.*only_train\) has no test images"):
        split.require("test")


# --- no images, bad files ---------------------------------------------------------------------


def _empty_image_folder(root):
    for part in ("train", "test"):
        (root / "empty" / part / "a").mkdir(parents=True)
    return "empty", r"no images in .*empty; expected an ImageFolder tree"


def _empty_imagenet_a(root):
    _imagenet_like(root, "imagenet-adversarial", "imagenet-a", ["n01440764"], per_class=0)
    return "imagenet-adversarial", r"no images in .*imagenet-adversarial; expected .*imagenet-a/"


def _empty_split_lists(root):
    entries = {"train": [], "val": [], "test": []}
    _split_file_dataset(root, *SPLIT_FILE_DATASETS[1], entries=entries)
    return "oxford_pets", r"split_zhou_OxfordPets.json lists no images"


@pytest.mark.parametrize("build", [_empty_image_folder, _empty_imagenet_a, _empty_split_lists])
def test_a_layout_without_images_is_an_error(tmp_path, build):
    name, message = build(tmp_path)
    with pytest.raises(InputError, match=message):
        load_dataset(tmp_path, name)


def _pets(root, text: str | bytes | None):
    """oxford_pets with ``text`` as its split file (a folder where it is None: unreadable)."""
    dataset = root / "oxford_pets"
    _image(dataset / "images" / "a.jpg")
    split_file = dataset / "split_zhou_OxfordPets.json"
    if text is None:
        split_file.mkdir()
    elif isinstance(text, bytes):
        split_file.write_bytes(text)
    else:
        split_file.write_text(text)
    return "oxford_pets"


def _entries(*labels_and_names):
    return json.dumps({"train": [["a.jpg", y, c] for y, c in labels_and_names], "test": []})


def _imagenet_classnames(root, text):
    dataset = root / "imagenet"
    _image(dataset / "images" / "val" / "n01440764" / "0.JPEG")
    (dataset / "classnames.txt").write_text(text)
    return "imagenet"


def _fgvc(root, variants, train_lines):
    dataset = root / "fgvc_aircraft"
    dataset.mkdir()
    (dataset / "variants.txt").write_text(variants)
    for part in ("train", "val", "test"):
        (dataset / f"images_variant_{part}.txt").write_text(train_lines if part == "train" else "")
    return "fgvc_aircraft"


BAD_FILES = {
    "labels skip a value": (
        lambda root: _pets(root, _entries((0, "abyssinian"), (2, "beagle"))),
        r"split_zhou_OxfordPets.json: labels skip 1 \(.*\); expected every label from 0 to 2",
    ),
    "empty split file": (
        lambda root: _pets(root, ""),
        r"split_zhou_OxfordPets.json is empty; expected CoOp's split JSON",
    ),
    "invalid JSON": (
        lambda root: _pets(root, '{"train": [["a.jpg", 0, "abyssinian"]'),
        r"split_zhou_OxfordPets.json is not valid JSON \(.*line 1 column .*\); expected",
    ),
    "not UTF-8": (
        lambda root: _pets(root, b"\xff\xfe\x00garbage"),
        r"split_zhou_OxfordPets.json is not UTF-8 text",
    ),
    "unreadable split file": (
        lambda root: _pets(root, None),
        r"cannot read .*split_zhou_OxfordPets.json \(Is a directory\)",
    ),
    "no train and test lists": (
        lambda root: _pets(root, "[1, 2]"),
        r'split_zhou_OxfordPets.json has no "train" and "test" lists',
    ),
    "malformed entry": (
        lambda root: _pets(root, json.dumps({"train": [["a.jpg", "x"]], "test": []})),
        r'split_zhou_OxfordPets.json: entry 0 of "train" is \["a.jpg", "x"\]; expected',
    ),
    "one label, two names": (
        lambda root: _pets(root, _entries((0, "abyssinian"), (0, "beagle"))),
        r"label 0 is both 'abyssinian' and 'beagle'",
    ),
    "image not where the layout puts it": (
        lambda root: _pets(root, json.dumps({"train": [["b.jpg", 0, "x"]], "test": []})),
        r"split_zhou_OxfordPets.json lists b.jpg, which is not in .*oxford_pets/images",
    ),
    "missing split file": (
        lambda root: (_image(root / "dtd" / "images" / "banded" / "0.jpg"), "dtd")[1],
        r"no split_zhou_DescribableTextures.json in .*dtd; expected CoOp's dtd layout",
    ),
    "classnames.txt line without a space": (
        lambda root: _imagenet_classnames(root, "n01440764 tench\nn01443537\n"),
        r"classnames.txt line 2: 'n01443537' has no space between wnid and class name",
    ),
    "empty classnames.txt": (
        lambda root: _imagenet_classnames(root, "\n"),
        r"classnames.txt is empty; expected '<wnid> <class name>' per line",
    ),
    "class folder not in classnames.txt": (
        lambda root: _imagenet_classnames(root, "n01443537 goldfish\n"),
        r"images/val/n01440764 is not a wnid of .*classnames.txt",
    ),
    "missing classnames.txt": (
        lambda root: (_image(root / "imagenet" / "images" / "val" / "n0" / "0.jpg"), "imagenet")[1],
        r"no classnames.txt in .*imagenet; expected '<wnid> <class name>' per line",
    ),
    "fgvc line without a space": (
        lambda root: _fgvc(root, "A300B4\n", "1025794\n"),
        r"images_variant_train.txt line 1: '1025794' has no space",
    ),
    "fgvc unknown variant": (
        lambda root: _fgvc(root, "A300B4\n", "1025794 707-320\n"),
        r"images_variant_train.txt line 1: .* names '707-320', not in variants.txt",
    ),
    "missing dataset folder": (
        lambda root: "oxford_pets",
        r"dataset folder not found: no .*oxford_pets, and .* is not itself a dataset folder",
    ),
}


@pytest.mark.parametrize("case", BAD_FILES)
def test_bad_files_raise_one_line_input_errors(tmp_path, case):
    build, message = BAD_FILES[case]
    root = tmp_path / "data"
    root.mkdir()
    name = build(root)
    with pytest.raises(InputError, match=message) as caught:
        load_dataset(root, name)
    assert "\n" not in str(caught.value)


def test_a_missing_folder_is_also_a_file_not_found_error(tmp_path):
    with pytest.raises(DatasetNotFoundError) as caught:
        load_dataset(tmp_path / "nowhere", None)
    assert isinstance(caught.value, InputError) and isinstance(caught.value, FileNotFoundError)
    assert str(caught.value) == f"dataset folder not found: {tmp_path / 'nowhere'} does not exist"


def test_a_dataset_name_without_root_is_an_error():
    with pytest.raises(InputError, match="dataset 'oxford_pets' needs a root folder"):
        load_dataset(None, "oxford_pets")


# --- fingerprints, digits, the move -----------------------------------------------------------


def test_listing_fingerprint_is_sha256_of_path_label_lines():
    samples = [("/data/pets/images/a.jpg", 0), ("/data/pets/images/b c.jpg", 1)]
    lines = b'["/data/pets/images/a.jpg", 0]\n["/data/pets/images/b c.jpg", 1]\n'
    assert listing_fingerprint(samples) == hashlib.sha256(lines).hexdigest()
    relative = b'["images/a.jpg", 0]\n["images/b c.jpg", 1]\n'
    assert listing_fingerprint(samples, root="/data/pets") == hashlib.sha256(relative).hexdigest()
    assert listing_fingerprint([samples[0], (samples[1][0], 0)]) != listing_fingerprint(samples)
    assert listing_fingerprint(samples[::-1]) != listing_fingerprint(samples)


def test_digit_samples_carry_their_index_in_scikit_learns_dataset():
    from sklearn.datasets import load_digits

    reference = load_digits()
    split = load_digits_split()
    assert len(split.train) == 600 and len(split.test) == 540
    for image, label in split.train[:50] + split.test[:50]:
        index = int(sample_id(image).removeprefix("digits:"))
        expected = (reference.images[index] * (255.0 / 16.0)).clip(0, 255).astype("uint8")
        np.testing.assert_array_equal(np.asarray(image)[:, :, 0], expected)
        assert label == reference.target[index]
    ids = [sample_id(image) for image, _ in split.train + split.test]
    assert len(set(ids)) == 1140
    assert listing_fingerprint(split.train) == listing_fingerprint(load_digits_split().train)
    images = ImageList(split.train[:2], lambda image: torch.tensor(image.size))
    assert images[0][0].tolist() == [8, 8]  # the trainer still opens them


def test_an_in_memory_image_without_an_index_is_identified_by_its_pixels():
    image = Image.new("RGB", (3, 2), (1, 2, 3))
    expected = hashlib.sha256(b"RGB 3x2 " + bytes([1, 2, 3] * 6)).hexdigest()
    assert sample_id(image) == f"pixels:{expected}"
    with pytest.raises(TypeError, match="image path or a PIL image, got int"):
        sample_id(3)


def test_pini_data_still_exports_the_loaders():
    """The loaders live in one module each of the pini.data package, read from there: the old
    flat modules are gone, and the package re-exports nothing."""
    assert load_dataset.__module__ == "pini.data.load"
    assert Split.__module__ == "pini.data.split"
    assert load_digits_split.__module__ == "pini.data.digits"
    package = Path(importlib.import_module("pini").__file__).parent
    assert not (package / "datasets.py").exists() and not (package / "data.py").exists()
    assert (package / "data").is_dir()
    assert not hasattr(importlib.import_module("pini.data"), "load_dataset")


# --- the one alias table ----------------------------------------------------------------------


def test_every_dataset_alias_gives_the_template_of_its_canonical_name():
    """Prompt templates are keyed by CoOp's folder names only; every other spelling goes through
    the data layer's alias table (docs/spec.md §9), so a name the loaders accept for a dataset
    picks that dataset's template."""
    assert set(TEMPLATES) == set(ZERO_SHOT_TEMPLATES) == set(DATASET_NAMES)
    for alias, name in DATASET_ALIASES.items():
        assert canonical_name(alias) == name, alias
        assert template_for(alias) == template_for(name) == TEMPLATES[name], alias
        assert zero_shot_template(alias) == zero_shot_template(name), alias
    for spelling in ("DescribableTextures", "describable_textures", "Describable Textures", "DTD"):
        assert canonical_name(spelling) == "dtd", spelling
        assert template_for(spelling) == "texture", spelling
        assert zero_shot_template(spelling) == "{} texture.", spelling
    assert template_for("my_folder") == "a photo of a"
    assert zero_shot_template("my_folder") == "a photo of a {}."
