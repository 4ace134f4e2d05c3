"""prodcat: batch categorisation of a product catalogue (Airflow + Beam/TFT + TF + ScaNN)."""

from pathlib import Path

from setuptools import find_packages, setup

REQUIREMENTS = [
    line.strip()
    for line in Path(__file__).with_name("requirements.txt").read_text().splitlines()
    if line.strip() and not line.startswith("#")
]

setup(
    name="prodcat",
    version="0.1.0",
    description="Keeps a large e-commerce catalogue categorised: Elasticsearch -> Beam/TFT -> TF -> ScaNN -> RabbitMQ -> Elasticsearch",
    python_requires=">=3.11,<3.12",
    packages=find_packages(include=["core", "services", "pipelines", "pipelines.*", "trainer", "entrypoints"]),
    package_data={"pipelines.report": ["templates/*.j2"]},
    install_requires=REQUIREMENTS,
    entry_points={
        "console_scripts": ["prodcat=entrypoints.cli:main"],
        "airflow.plugins": ["prodcat=entrypoints.airflow_plugin:ProdcatPlugin"],
    },
)
