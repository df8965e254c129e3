"""schemathesis against a running server's own spec: no 5xx, every response as documented."""

from __future__ import annotations

import json
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    negative_data_rejection,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from ratekeeper.api.spec import openapi_document
from ratekeeper.api.wire import batch_request_type, check_request_type
from ratekeeper.config.rules import load_config

from support.common import EXAMPLE
from support.processes import ServerProcess
from support.redis_servers import RedisServer

ADMIN_TOKEN = "fuzz-admin-token-0123456789"
CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance,
          response_schema_conformance, response_headers_conformance, negative_data_rejection]


SPEC_CONFIG = load_config(EXAMPLE)
_CHECK_TYPE = check_request_type(SPEC_CONFIG.subjects)
SPEC = openapi_document(_CHECK_TYPE, batch_request_type(_CHECK_TYPE))
OPERATIONS = [result.ok() for result in schemathesis.openapi.from_dict(SPEC)
              .get_all_operations()]


@pytest.fixture(scope="module")
def server(redis_server: RedisServer, tmp_path_factory: pytest.TempPathFactory
           ) -> Iterator[ServerProcess]:
    """A real `ratekeeper serve` with the example config and a real Redis."""
    directory: Path = tmp_path_factory.mktemp("fuzz")
    config = directory / "pypi.toml"
    config.write_text(EXAMPLE.read_text())
    process = ServerProcess(config, {
        "RATEKEEPER_REDIS_URL": redis_server.url,
        "RATEKEEPER_IP_SALT": "fuzzing-salt-0123456789",
        "RATEKEEPER_KEY_PREFIX": "fuzz",
        "RATEKEEPER_ADMIN_TOKENS": f"fuzzer:{ADMIN_TOKEN}",
        "RATEKEEPER_REDIS_TIMEOUT_MS": "2000",
    })
    yield process
    log = process.stop()
    assert "Traceback" not in log, log


def test_the_server_serves_the_fuzzed_spec(server: ServerProcess) -> None:
    """What is fuzzed below is exactly what the running server documents."""
    with urllib.request.urlopen(f"{server.url}/openapi.json", timeout=5) as resp:
        assert json.load(resp) == json.loads(json.dumps(SPEC))


@pytest.mark.parametrize("operation", OPERATIONS, ids=[op.label for op in OPERATIONS])
def test_every_endpoint_conforms_and_never_5xx(server: ServerProcess,
                                              operation: schemathesis.APIOperation) -> None:
    """Generated and mutated requests: never a 5xx; status, type, body and headers as specced."""

    @given(case=operation.as_strategy())
    @settings(max_examples=40, deadline=None, suppress_health_check=list(HealthCheck),
              database=None)
    def run(case: schemathesis.Case) -> None:
        case.call_and_validate(base_url=server.url, checks=CHECKS, timeout=10,
                               headers={"Authorization": f"Bearer {ADMIN_TOKEN}"})

    run()
