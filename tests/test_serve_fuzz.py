"""Fuzz the service from its own OpenAPI schema (schemathesis, in-process ASGI): no input may cause a 5xx.

Cases come from schemathesis' strategies driven by Hypothesis directly, because its pytest plugin does not
work with pytest 9 (it reads a removed private node attribute).
"""

import pytest

schemathesis = pytest.importorskip("schemathesis")
from hypothesis import HealthCheck, given, settings
from schemathesis import GenerationMode

from hemaseg.inference.predictor import load_model
from hemaseg.serve import Settings, create_app

OPERATIONS = ["POST /v1/segment", "GET /v1/model", "GET /healthz", "GET /readyz"]


@pytest.fixture(scope="module")
def fuzz_schema(tiny_run):
    app = create_app(load_model(tiny_run, device="cpu"), Settings(max_upload_bytes=256 * 1024,
                                                                    allowed_hosts=("testserver",)))
    app.state.service.warm_up()  # the lifespan does not run here; /readyz must say ready, not 503
    return schemathesis.openapi.from_asgi("/openapi.json", app)


def test_schema_lists_every_operation(fuzz_schema):
    labels = {result.ok().label for result in fuzz_schema.get_all_operations()}
    assert labels == set(OPERATIONS)


@pytest.mark.parametrize("label,mode", [
    *[(label, GenerationMode.POSITIVE) for label in OPERATIONS],
    # negative cases need a parameter, body or header to break; the probes have none
    ("POST /v1/segment", GenerationMode.NEGATIVE), ("GET /v1/model", GenerationMode.NEGATIVE),
], ids=lambda x: getattr(x, "value", x))
def test_no_input_makes_a_server_error(fuzz_schema, label, mode):
    operation = fuzz_schema.find_operation_by_label(label)

    @given(case=operation.as_strategy(generation_mode=mode))
    @settings(max_examples=30, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True,
              database=None)
    def check(case):
        response = case.call()
        assert response.status_code < 500, f"{label} -> {response.status_code}: {response.text[:300]}"
        if response.status_code >= 400:
            assert set(response.json()) == {"error"}, response.text[:300]

    check()
