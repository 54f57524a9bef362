"""Property-based tests of the HTTP APIs: schemathesis generates requests from the served `/openapi.json`
(native and V2 JSON routes) against a real `dropwise serve`; no answer may be a 5xx and every documented
answer must match its schema. `DROPWISE_SCHEMATHESIS_CASES` sets the total number of cases (default 1000).
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Any

import hypothesis
import pytest
import schemathesis
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import response_schema_conformance
from test_service_fixtures import build_service_repository, running_server

CASES = int(os.environ.get("DROPWISE_SCHEMATHESIS_CASES", "1000"))
#: repository control changes what is served while the test runs: covered by test_service_repository.py
EXCLUDED = ("/v2/repository/",)


@pytest.fixture(scope="module")
def repo(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_service_repository(request, tmp_path_factory.mktemp("svc"))


@pytest.mark.slow
def test_generated_requests_never_answer_5xx_and_match_the_schema(repo: Path) -> None:
    with running_server(repo, "--device", "cpu") as base:
        schema = schemathesis.openapi.from_url(f"{base}/openapi.json")
        operations = [
            result.ok()
            for result in schema.get_all_operations()
            if not any(result.ok().path.startswith(prefix) for prefix in EXCLUDED)
        ]
        assert any(op.path == "/v1/models/{name}/predict" for op in operations)
        assert any(op.path == "/v2/models/{model}/infer" for op in operations)
        ran = 0
        failures: list[str] = []

        def explore(operation: Any, examples: int, seed: int) -> None:
            @hypothesis.seed(seed)
            @hypothesis.settings(
                max_examples=examples,
                deadline=None,
                database=None,
                phases=[hypothesis.Phase.explicit, hypothesis.Phase.generate],
                suppress_health_check=list(hypothesis.HealthCheck),
            )
            @hypothesis.given(case=operation.as_strategy())
            def check(case: schemathesis.Case) -> None:
                nonlocal ran
                ran += 1
                response = case.call(base_url=base, timeout=60)
                try:
                    case.validate_response(response, checks=[not_a_server_error, response_schema_conformance])
                except Exception as exc:  # collect every operation's first failure, then report them all
                    failures.append(f"{case.method} {case.formatted_path} -> {response.status_code}: {exc}")
                    raise

            with contextlib.suppress(Exception):  # recorded in `failures`, reported below
                check()

        # every operation once; then more cases for the ones with inputs to vary until CASES have run
        for operation in operations:
            explore(operation, max(1, CASES // len(operations)), 0)
        rich = [op for op in operations if op.method.upper() == "POST" or "{" in op.path]
        round_ = 1
        while ran < CASES and round_ < 20:
            for operation in rich:
                explore(operation, max(1, -(-(CASES - ran) // len(rich))), round_)
            round_ += 1
        assert ran >= CASES, ran
        assert not failures, "\n".join(failures[:10])
