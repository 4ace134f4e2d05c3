"""Human labels: the CSV import into Elasticsearch (bad rows reported, good rows imported) and the
review index (one document per run and product)."""

import gzip
import json

import pytest

from core import storage
from core.taxonomy import CategoryTree
from pipelines.human_labels import MALFORMED, UNKNOWN_CATEGORY, UNKNOWN_ID, import_labels, parse_labels
from pipelines.review import write_review
from services.search_index import seed_catalogue
from trainer.review import REVIEW_FILE

from conftest import REPO

pytestmark = pytest.mark.service

TREE = CategoryTree.load_json(REPO / "data" / "fashion_categories.json")
FLATS = "Footwear > Shoes > Flats"
EARRINGS = "Accessories > Jewellery > Earrings"


@pytest.fixture
def seeded(es, unique):
    products, categories = f"products-{unique}", f"categories-{unique}"
    docs = [{"id": f"p{i}", "title": f"product {i}", "rule_categories": ["Footwear"], "human_categories": ["Footwear"]} for i in range(5)]
    seed_catalogue(es, docs, TREE, products, categories)
    yield products
    es.indices.delete(index=[products, categories])


CSV = "\n".join(
    [
        "id,category",
        f"p0,{FLATS}",
        f"p0,{FLATS}",  # a repeat: one label
        f"p1,{EARRINGS}",
        "p2,Footwear > Shoes > Glass Slippers",  # unknown category
        f"p404,{FLATS}",  # unknown product id
        "p3",  # too few fields
        f"p3,{FLATS},extra",  # too many
        f",{FLATS}",  # no id
        "",  # a blank line is skipped, not an error
        f"p1,{FLATS}",  # a second label of p1
    ]
)


def test_import_keeps_the_good_rows_and_reports_each_bad_one_with_its_line_and_reason(es, seeded):
    summary = import_labels(es, seeded, "human_categories", CSV, TREE)
    assert [(b["line"], b["reason"]) for b in summary["bad"]] == [
        (5, UNKNOWN_CATEGORY),
        (6, UNKNOWN_ID),
        (7, MALFORMED),
        (8, MALFORMED),
        (9, MALFORMED),
    ]
    assert summary["bad_rows"] == 5 and summary["bad_rows_by_reason"] == {UNKNOWN_CATEGORY: 1, UNKNOWN_ID: 1, MALFORMED: 3}
    assert summary["products_updated"] == 2 and summary["labels_imported"] == 3
    docs = {d["_id"]: d["_source"] for d in es.mget(index=seeded, ids=["p0", "p1", "p2"])["docs"]}
    assert docs["p0"]["human_categories"] == [FLATS]
    assert docs["p1"]["human_categories"] == [EARRINGS, FLATS]
    # a partial update: the rest of the document stays; a product without good rows is untouched
    assert docs["p0"]["title"] == "product 0" and docs["p0"]["rule_categories"] == ["Footwear"]
    assert docs["p2"]["human_categories"] == ["Footwear"]
    again = import_labels(es, seeded, "human_categories", CSV, TREE)  # idempotent: labels replaced, not appended
    assert again["products_updated"] == 2
    assert es.get(index=seeded, id="p1")["_source"]["human_categories"] == [EARRINGS, FLATS]


def test_a_file_without_the_id_and_category_columns_is_refused_whole():
    with pytest.raises(ValueError, match="header"):
        parse_labels("product,label\np0,x\n", TREE)


def test_review_records_are_indexed_once_per_run_and_product(es, unique, tmp_path):
    index = f"review-{unique}"
    records = [
        {"run_id": "r1", "product_id": "p1", "reason": "uncertain", "category": FLATS, "score": 0.49, "threshold": 0.5, "distance": 0.01},
        {"run_id": "r1", "product_id": "p2", "reason": "few_examples", "category": FLATS, "score": 0.8, "threshold": None, "distance": 0.2},
    ]
    with storage.atomic_stage(str(tmp_path / "predict")) as tmp:
        with gzip.open(f"{tmp}/{REVIEW_FILE}", "wb") as f:
            f.write(b"".join(json.dumps(r).encode() + b"\n" for r in records))
    try:
        assert write_review(es, index, str(tmp_path / "predict")) == 2
        assert write_review(es, index, str(tmp_path / "predict")) == 2  # a rerun overwrites
        es.indices.refresh(index=index)
        hits = es.search(index=index, query={"match_all": {}}, sort=[{"product_id": "asc"}])["hits"]["hits"]
        assert [(h["_id"], h["_source"]["reason"]) for h in hits] == [("r1:p1", "uncertain"), ("r1:p2", "few_examples")]
    finally:
        es.indices.delete(index=index)
