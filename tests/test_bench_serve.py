"""`serve_model`, the server `cushing bench serve` measures: one that cannot start is reported with its own error
(not a failure to stop it), and when the block ends, also by an exception, the server is stopped with all its
processes."""
from __future__ import annotations

import time

import pytest
import requests

from cushing.ops.stack import StackError, port_open
from cushing.ops.stack.processes import _listeners
from cushing.workflows.bench_serve import serve_model
from tests.conftest import running

pytestmark = [pytest.mark.slow]

MODEL_CODE = '''
import mlflow
from mlflow.pyfunc import PythonModel


class Length(PythonModel):
    def predict(self, context, model_input, params=None):
        return [len(str(v)) for v in model_input["image"]]


mlflow.models.set_model(Length())
'''


def test_a_server_that_cannot_start_is_reported_with_its_own_error(tmp_path):
    missing = tmp_path / "no-such-model"
    with pytest.raises(StackError, match="exited") as e:
        with serve_model(str(missing), timeout=180):
            pytest.fail("a model that does not exist was served")
    assert "No such artifact: 'no-such-model'" in str(e.value), "the server's own output says what went wrong"


def test_the_server_stops_with_its_processes_when_the_block_ends_by_an_exception(tmp_path):
    import mlflow

    code = tmp_path / "model_code.py"
    code.write_text(MODEL_CODE)
    mlflow.pyfunc.save_model(path=str(tmp_path / "model"), python_model=str(code))
    with pytest.raises(RuntimeError, match="the benchmark broke"):
        with serve_model(str(tmp_path / "model"), timeout=300) as url:
            r = requests.post(f"{url}/invocations", json={"dataframe_records": [{"image": "abcd"}]}, timeout=60)
            assert r.status_code == 200 and r.json()["predictions"] == [4], r.text
            port = int(url.rsplit(":", 1)[1])
            serving = _listeners(port)
            assert serving
            raise RuntimeError("the benchmark broke")
    deadline = time.time() + 5
    while any(running(p) for p in serving) and time.time() < deadline:
        time.sleep(0.1)
    assert not any(running(p) for p in serving), "a server process outlived the block"
    assert not port_open(port)
