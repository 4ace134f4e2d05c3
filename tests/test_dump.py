"""The dump: point-in-time + search_after slices into a run folder, local or on GCS (emulator)."""

import os

import pytest

from core import storage
from core.config import load_config
from core.taxonomy import CategoryTree
from pipelines.dump import dump_products, product_fields, product_query
from services.search_index import seed_catalogue

from conftest import REPO

pytestmark = pytest.mark.service

TOPS = "Apparel > Topwear > Tshirts"
SHOES = "Footwear > Shoes > Casual Shoes"
CFG = load_config(REPO / "feature_config.yaml")
FIELDS = product_fields(CFG)


def product(i: int) -> dict:
    doc = {
        "id": f"p{i:05d}",
        "title": f"product {i}",
        "gender": "Men",
        "image_url": f"file:///nowhere/{i}.jpg",
        "true_category": TOPS if i % 2 else SHOES,
        "rule_categories": [],
    }
    if i % 3 == 0:
        doc["rule_categories"] = [TOPS]
    if i % 5 == 0:
        doc["predicted_categories"] = [{"id": "Footwear", "level": 1, "score": 0.9}]
    return doc


@pytest.fixture
def seeded(es, unique):
    tree = CategoryTree.load_json(REPO / "data" / "fashion_categories.json")
    products, categories = f"products-{unique}", f"categories-{unique}"
    seed_catalogue(es, (product(i) for i in range(1050)), tree, products, categories)
    yield products, categories, tree
    es.indices.delete(index=[products, categories])


def dumped_ids(stage_dir: str) -> list:
    return [d["id"] for d in storage.read_json_lines(stage_dir, "products-*.jsonl.gz")]


def test_every_product_exactly_once_across_slices_and_pages(es, seeded, tmp_path):
    products, categories, tree = seeded
    out = str(tmp_path / "run" / "dump")
    summary = dump_products(es, products, categories, out, FIELDS, slices=3, page_size=100)
    ids = dumped_ids(out)
    assert summary["products"] == 1050 and sorted(ids) == sorted(product(i)["id"] for i in range(1050))
    assert len(storage.list_files(out, "products-*.jsonl.gz")) == 3
    assert storage.read_json(os.path.join(out, "categories.json")) == tree.to_records()


def test_rerun_replaces_the_stage_and_a_limit_caps_it(es, seeded, tmp_path):
    products, categories, _ = seeded
    out = str(tmp_path / "dump")
    dump_products(es, products, categories, out, FIELDS, slices=2, page_size=100)
    dump_products(es, products, categories, out, FIELDS, slices=2, page_size=100, limit=100)
    assert len(dumped_ids(out)) == 100
    assert sorted(os.listdir(tmp_path)) == ["dump"]  # no temporary folder left behind


def test_category_subset_follows_rule_and_predicted_labels_never_the_ground_truth(es, seeded, tmp_path):
    products, categories, _ = seeded
    out = str(tmp_path / "dump")
    dump_products(es, products, categories, out, FIELDS, page_size=100, query=product_query(CFG.labels.rule_field, ["Apparel"]))
    assert sorted(dumped_ids(out)) == sorted(product(i)["id"] for i in range(1050) if i % 3 == 0)
    dump_products(
        es, products, categories, out, FIELDS, page_size=100, query=product_query(CFG.labels.rule_field, ["Footwear", "Apparel > Topwear"])
    )
    assert sorted(dumped_ids(out)) == sorted(product(i)["id"] for i in range(1050) if i % 3 == 0 or i % 5 == 0)


def test_dump_into_a_gcs_run_folder(es, seeded, gcs_bucket):
    products, categories, _ = seeded
    out = storage.join(storage.run_dir(gcs_bucket, "prodcat_categorise", "scheduled__2026-11-22T00:00:00+00:00"), "dump")
    assert out == "gs://prodcat-runs/runs/prodcat_categorise/scheduled__2026-11-22T00_00_00_00_00/dump"
    dump_products(es, products, categories, out, FIELDS, slices=2, page_size=200)
    dump_products(es, products, categories, out, FIELDS, slices=2, page_size=200)  # a rerun replaces it
    assert sorted(dumped_ids(out)) == sorted(product(i)["id"] for i in range(1050))
    assert storage.read_json(storage.join(out, "summary.json"))["products"] == 1050
    leftovers = [m.path for m in storage.FileSystems.match([f"{gcs_bucket}/runs/**"])[0].metadata_list if "/dump/" not in m.path]
    assert leftovers == []
