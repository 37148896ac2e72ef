"""Reading a ``/metrics`` page in tests, with prometheus_client's own parser."""

from __future__ import annotations

from prometheus_client.parser import text_string_to_metric_families


def sample_value(text: str, name: str, **labels: str) -> float | None:
    """The value of sample ``name`` whose labels include ``labels``; ``None`` if there is none.

    ``name`` is the sample's name (``http_requests_total``, ``model_batch_size_count``, ...).
    """
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and labels.items() <= sample.labels.items():
                return sample.value
    return None


def label_sets(text: str, name: str) -> list[dict[str, str]]:
    """The label sets of every sample called ``name``."""
    return [
        dict(sample.labels)
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.name == name
    ]
