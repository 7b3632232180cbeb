"""/docs shows every endpoint with a description, examples and problem+json error responses."""

from __future__ import annotations

import re
import uuid
from typing import Any

import httpx
from openapi_spec_validator import validate

from app.events.outbox import EventType, MessageEventPayload
from app.events.routes import message_event_example
from app.kernel.pagination import decode_cursor
from app.main import create_app
from app.web.params import CURSOR_EXAMPLE, SEQUENCE_CURSOR_EXAMPLE
from tests.conftest import World


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


def test_the_document_is_valid_openapi_3_1() -> None:
    spec = create_app().openapi()

    assert spec["openapi"].startswith("3.1")
    validate(spec)  # raises on any schema violation


def _has_example(node: dict[str, Any], schemas: dict[str, Any]) -> bool:
    if "example" in node or "examples" in node:
        return True
    schema = node.get("schema", {})
    if "example" in schema or "examples" in schema:
        return True
    ref = node.get("$ref") or schema.get("$ref")
    if ref:
        target = schemas[ref.rsplit("/", 1)[-1]]
        return "examples" in target or "example" in target
    return False


def test_every_parameter_body_and_response_has_a_description_and_an_example() -> None:
    spec = create_app().openapi()
    schemas = spec["components"]["schemas"]
    gaps = []
    for path, method, operation in operations():
        for parameter in operation.get("parameters", []):
            if not parameter.get("description"):
                gaps.append(f"{method} {path} parameter {parameter['name']}: description")
            if not _has_example(parameter, schemas):
                gaps.append(f"{method} {path} parameter {parameter['name']}: example")
        for media_type, body in operation.get("requestBody", {}).get("content", {}).items():
            if not _has_example(body, schemas):
                gaps.append(f"{method} {path} body {media_type}: example")
        for status, response in operation["responses"].items():
            if not response.get("description"):
                gaps.append(f"{method} {path} {status}: description")
            for media_type, content in response.get("content", {}).items():
                if not _has_example(content, schemas):
                    gaps.append(f"{method} {path} {status} {media_type}: example")

    assert gaps == []


def test_each_message_event_example_shows_its_own_type_and_status() -> None:
    spec = create_app().openapi()
    message_hooks = [name for name in spec["webhooks"] if name.startswith("message.")]

    assert len(message_hooks) == 7
    for name in message_hooks:
        body = spec["webhooks"][name]["post"]["requestBody"]["content"]["application/json"]
        (example,) = (entry["value"] for entry in body["examples"].values())
        assert example["type"] == name
        assert example["data"]["status"] == name.removeprefix("message.")
        # A payload the receiver could really get (the document itself leaves out the nulls).
        assert (
            MessageEventPayload.model_validate(message_event_example(EventType(name))).type == name
        )


async def test_docs_pages_load_their_assets_from_this_service(api: httpx.AsyncClient) -> None:
    for page, assets in (
        ("/docs", ("swagger-ui-bundle.js", "swagger-ui.css")),
        ("/redoc", ("redoc.standalone.js",)),
    ):
        html = (await api.get(page)).text
        sources = re.findall(r'(?:src|href)="([^"]+)"', html)

        assert sources and all(source.startswith("/") for source in sources), sources
        for asset in assets:
            assert f"/docs-assets/{asset}" in sources
            served = await api.get(f"/docs-assets/{asset}")
            assert served.status_code == 200 and len(served.content) > 100_000


def test_every_operation_documents_the_statuses_of_the_http_edge() -> None:
    for path, method, operation in operations():
        responses = operation["responses"]
        assert {"413", "431"} <= set(responses), (method, path)
        if method in ("post", "put", "patch"):  # a body that cannot be parsed
            assert "400" in responses, (method, path)
        if path != "/healthz":
            assert "503" in responses, (method, path)


def test_documented_cursor_examples_are_cursors_the_lists_accept() -> None:
    spec = create_app().openapi()
    parse_id = {
        "/v1/messages": uuid.UUID,
        "/v1/inbound": uuid.UUID,
        "/v1/event-endpoints": uuid.UUID,
        "/v1/held-messages": uuid.UUID,
    }
    checked = 0
    for path, _, operation in operations():
        for parameter in operation.get("parameters", []):
            if parameter["name"] != "cursor":
                continue
            (example,) = parameter["examples"].values() if "examples" in parameter else [None]
            value = example["value"] if example else parameter["schema"]["examples"][0]
            decode_cursor(value, parse_id.get(path, int))  # raises when it is not one
            checked += 1
    page = spec["components"]["schemas"]["MessagePage"]["examples"][0]
    decode_cursor(page["next_cursor"], uuid.UUID)
    assert checked >= 5  # messages, inbound, opt-outs, events, event endpoints


async def test_the_documented_cursor_examples_are_accepted_by_the_service(
    api: httpx.AsyncClient, world: World
) -> None:
    for path in ("/v1/messages", "/v1/inbound", "/v1/opt-outs", "/v1/events"):
        cursor = CURSOR_EXAMPLE if path in ("/v1/messages", "/v1/inbound") else None
        cursor = cursor or SEQUENCE_CURSOR_EXAMPLE
        response = await api.get(
            path, params={"cursor": cursor}, headers=world.auth(world.admin_key)
        )
        assert response.status_code == 200, (path, response.text)


def test_a_custom_keyword_must_not_be_empty_in_the_schema_as_in_the_service() -> None:
    schemas = create_app().openapi()["components"]["schemas"]
    keyword = schemas["CustomKeyword"]["properties"]["keyword"]
    assert keyword["minLength"] == 1
    (words,) = schemas["CategoryConfig"]["properties"]["keywords"]["patternProperties"].values()
    assert words["items"]["minLength"] == 1
