"""The reconciler's memory of its own writes: looked up by object (the watch's echo check) and by model (a
reconcile's reads), consistent under both indexes."""

from __future__ import annotations

import threading
from typing import Any

from recserve_operator.names import MODEL_LABEL
from recserve_operator.reconcile import _AppliedObjects


def obj(kind: str, name: str, model: str, rv: str = "1") -> dict[str, Any]:
    return {"kind": kind, "metadata": {"name": name, "resourceVersion": rv, "labels": {MODEL_LABEL: model}}}


def test_a_models_writes_are_found_by_object_and_by_model_and_no_other_models() -> None:
    applied = _AppliedObjects()
    for model in ("a", "b"):
        applied.put(("Deployment", "ns", f"{model}-r1"), obj("Deployment", f"{model}-r1", model))
        applied.put(("Service", "ns", model), obj("Service", model, model))
    applied.put(("Deployment", "other", "a-r1"), obj("Deployment", "a-r1", "a"))
    assert [k for k, _ in applied.of_model("Deployment", "ns", "a")] == [("Deployment", "ns", "a-r1")]
    assert [k for k, _ in applied.of_model("Service", "ns", "b")] == [("Service", "ns", "b")]
    assert applied.of_model("Deployment", "ns", "c") == []
    got = applied.get(("Deployment", "other", "a-r1"))
    assert got is not None and got["metadata"]["name"] == "a-r1"
    assert len(applied) == 5


def test_a_newer_write_replaces_the_older_and_pop_removes_it_from_both_indexes() -> None:
    applied = _AppliedObjects()
    key = ("Deployment", "ns", "a-r1")
    applied.put(key, obj("Deployment", "a-r1", "a", rv="1"))
    applied.put(key, obj("Deployment", "a-r1", "a", rv="2"))
    [(_, latest)] = applied.of_model("Deployment", "ns", "a")
    assert latest["metadata"]["resourceVersion"] == "2" and len(applied) == 1
    assert applied.pop(key) is latest
    assert applied.pop(key) is None
    assert applied.of_model("Deployment", "ns", "a") == [] and applied.get(key) is None


def test_forgetting_a_model_drops_its_writes_only() -> None:
    applied = _AppliedObjects()
    for model in ("a", "b"):
        for kind in ("Deployment", "Service", "ConfigMap"):
            applied.put((kind, "ns", f"{model}-{kind}"), obj(kind, f"{model}-{kind}", model))
    applied.forget_model("ns", "a")
    assert len(applied) == 3
    assert all(applied.of_model(k, "ns", "a") == [] for k in ("Deployment", "Service", "ConfigMap"))
    assert len(applied.of_model("Service", "ns", "b")) == 1


def test_concurrent_writers_and_readers_keep_the_indexes_consistent() -> None:
    applied = _AppliedObjects()
    errors: list[BaseException] = []

    def worker(model: str) -> None:
        try:
            for i in range(300):
                key = ("Deployment", "ns", f"{model}-{i % 7}")
                applied.put(key, obj("Deployment", key[2], model, rv=str(i)))
                applied.of_model("Deployment", "ns", model)
                if i % 3 == 0:
                    applied.pop(key)
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(f"m{t}",)) for t in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    total = sum(len(applied.of_model("Deployment", "ns", f"m{t}")) for t in range(8))
    assert total == len(applied)
