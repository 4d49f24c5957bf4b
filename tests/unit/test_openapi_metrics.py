"""The interfaces that follow from the operations table, checked by tools no one here
wrote: the OpenAPI document by openapi-spec-validator, the metrics by
prometheus_client's parser."""

from __future__ import annotations

from sharedlvm import http_api, operations
from sharedlvm.metrics import Metrics


def test_openapi_document_validates() -> None:
    from openapi_spec_validator import validate

    doc = http_api.openapi()
    validate(doc)  # raises on any problem (unresolved path parameters, bad schemas)


def test_openapi_has_every_route_with_typed_request_and_response() -> None:
    doc = http_api.openapi()
    for op in operations.TABLE:
        if op.http is None:
            continue
        method, path = op.http
        entry = doc["paths"][path][method.lower()]
        response = entry["responses"][str(op.http_status)]["content"]["application/json"]
        assert response["schema"], op.name
        if method == "POST" and op.name == "volume.create":
            body = entry["requestBody"]["content"]["application/json"]["schema"]
            assert body["required"] == ["size"]
            assert set(body["properties"]) == {"size", "format", "alloc", "image", "tags",
                                               "request_id"}
        for param in http_api.path_params(op):
            assert {"name": param, "in": "path", "required": True,
                    "schema": {"type": "string"}} in entry["parameters"]
    volume = doc["paths"]["/v1/domains/{domain}/volumes/{volume}"]["get"]
    schema = volume["responses"]["200"]["content"]["application/json"]["schema"]
    assert schema["properties"]["state"] == {"type": "string",
                                             "enum": ["ready", "creating", "removing",
                                                      "merged", "unknown"]}
    assert schema["properties"]["parent"]["nullable"] is True


def test_metrics_parse_as_prometheus_text_with_histograms() -> None:
    from prometheus_client.parser import text_string_to_metric_families

    metrics = Metrics()
    for seconds in (0.003, 0.04, 0.04, 0.3, 7.0):
        metrics.observe("volume.create", True, seconds)
    metrics.observe("volume.delete", False, 0.2)
    gauges = [("manager", "1 if manager.", {"domain": d, "host_id": "1"}, 1.0)
              for d in ("a", "b")] + \
             [("lockspace_joined", "1 if joined.", {"domain": d, "host_id": "1"}, 1.0)
              for d in ("a", "b")]
    families = {f.name: f for f in text_string_to_metric_families(metrics.render(gauges))}
    hist = families["sharedlvm_request_duration_seconds"]
    assert hist.type == "histogram"
    buckets = {(s.labels["op"], s.labels.get("le")): s.value for s in hist.samples
               if s.name.endswith("_bucket")}
    assert buckets[("volume.create", "0.005")] == 1
    assert buckets[("volume.create", "0.05")] == 3
    assert buckets[("volume.create", "+Inf")] == 5
    counts = {s.labels["op"]: s.value for s in hist.samples if s.name.endswith("_count")}
    assert counts == {"volume.create": 5, "volume.delete": 1}
    requests = families["sharedlvm_requests"]
    assert {(s.labels["op"], s.labels["outcome"]): s.value for s in requests.samples} == \
        {("volume.create", "ok"): 5, ("volume.delete", "error"): 1}
    assert len(families["sharedlvm_manager"].samples) == 2
