"""The DAG benchmark's growth catalogue: perturbed copies with new ids and the originals' images."""

import csv

import pytest

from benchmarks.scaled_catalogue import perturbed_title, write_scaled_catalogue

pytestmark = pytest.mark.unit

HEADER = "id,gender,masterCategory,subCategory,articleType,baseColour,season,year,usage,productDisplayName"


def test_perturbed_title_shuffles_the_words_and_swaps_two_letters():
    assert perturbed_title("Puma Men Black Watch", "7-1") == "Puma Watch Blcak Men"
    assert perturbed_title("Puma Men Black Watch", "7-2") == "Men Watch Balck Puma"
    assert perturbed_title("Cap", "9-1") == "Cpa"
    assert perturbed_title("Tee", "9-1") == "Tee"  # no two different inner letters to swap


def test_scaled_catalogue_is_the_original_then_perturbed_copies_with_new_ids(tmp_path):
    source = tmp_path / "source"
    (source / "images").mkdir(parents=True)
    (source / "styles.csv").write_text(
        f"{HEADER}\n"
        "7,Men,Accessories,Watches,Watches,Black,Winter,2016,Casual,Puma Men Black Watch\n"
        "42,Men,Apparel,Topwear,Tshirts,Red,Summer,2012,Casual,Tee\n"
    )
    (source / "images" / "7.jpg").write_bytes(b"jpeg bytes")

    assert write_scaled_catalogue(source, tmp_path / "x3", 3) == 6

    with open(tmp_path / "x3" / "styles.csv", newline="") as f:
        rows = [(r["id"], r["articleType"], r["productDisplayName"]) for r in csv.DictReader(f)]
    assert rows == [
        ("7", "Watches", "Puma Men Black Watch"),
        ("42", "Tshirts", "Tee"),
        ("107", "Watches", "Puma Watch Blcak Men"),
        ("142", "Tshirts", "Tee"),
        ("207", "Watches", "Men Watch Balck Puma"),
        ("242", "Tshirts", "Tee"),
    ]
    images = tmp_path / "x3" / "images"
    assert sorted(p.name for p in images.iterdir()) == ["107.jpg", "207.jpg", "7.jpg"]
    assert all(p.is_symlink() and p.read_bytes() == b"jpeg bytes" for p in images.iterdir())
