"""One call through the in-process gateway, and checks of the OpenAI error envelope it answers with."""

from __future__ import annotations

import httpx

from tests.unit.fakes import ScriptedWorker, gateway_client, mock_client, settings_for


def assert_envelope(response: httpx.Response, status: int, error_type: str | None = None) -> dict[str, object]:
    """The error `response` carries, checked to be an OpenAI envelope with `status` (and `error_type`)."""
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["message"]
    if error_type is not None:
        assert error["type"] == error_type
    return error  # type: ignore[no-any-return]


async def gateway_post(worker: ScriptedWorker, body: object, path: str = "/v1/chat/completions", **kwargs: object
                       ) -> httpx.Response:
    """`body` posted through a gateway in front of `worker` alone; `kwargs` are its settings."""
    async with gateway_client(settings_for(worker.url, **kwargs), mock_client(worker)) as (client, _):
        if isinstance(body, bytes):
            return await client.post(path, content=body, headers={"content-type": "application/json"})
        return await client.post(path, json=body)


def never_called(request: httpx.Request) -> httpx.Response:
    raise AssertionError("the worker must not be reached")
