"""/docs shows every endpoint with a description, examples and problem+json error responses."""

from __future__ import annotations

from typing import Any

import httpx

from app.main import create_app


def operations() -> list[tuple[str, str, dict[str, Any]]]:
    spec = create_app().openapi()
    return [
        (path, method, operation)
        for path, item in spec["paths"].items()
        for method, operation in item.items()
    ]


def test_every_operation_is_described_and_errors_are_problem_json() -> None:
    for path, method, operation in operations():
        assert operation.get("description"), (method, path)
        for status, response in operation["responses"].items():
            if status.startswith("4") and path.startswith("/v1/"):
                assert list(response["content"]) == ["application/problem+json"], (path, status)
                schema = response["content"]["application/problem+json"]["schema"]
                assert schema == {"$ref": "#/components/schemas/Problem"}, (path, status)


def test_authenticated_endpoints_document_401_and_the_bearer_scheme() -> None:
    spec = create_app().openapi()
    assert spec["components"]["securitySchemes"]["HTTPBearer"]["scheme"] == "bearer"
    for path, method, operation in operations():
        if path.startswith(("/v1/messages", "/v1/senders")):
            assert "401" in operation["responses"], (method, path)
            assert operation["security"] == [{"HTTPBearer": []}]


def test_send_documents_its_request_example_and_refusals() -> None:
    spec = create_app().openapi()
    send = spec["paths"]["/v1/messages"]["post"]
    body_schema = spec["components"]["schemas"]["SendMessageRequest"]

    assert body_schema["examples"][0]["to"] == "+14155550123"
    refusals = send["responses"]["403"]["content"]["application/problem+json"]["examples"]
    assert "recipient_opted_out" in refusals
    assert "Idempotency-Key" in [p["name"] for p in send["parameters"]]


async def test_docs_are_served(api: httpx.AsyncClient) -> None:
    docs = await api.get("/docs")
    spec = await api.get("/openapi.json")

    assert docs.status_code == 200 and "swagger" in docs.text.lower()
    assert spec.json()["info"]["title"] == "smsgate"
