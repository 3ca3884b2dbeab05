"""deepspec's vLLM plugin (data_tools/vllm_plugin/deepspec_vllm_final_state.py) without vLLM.

Protects: the wrapped model class appends its own final hidden state as the last aux state exactly
when id L + 1 was requested, hides that id from the model, keeps the stock behaviour otherwise and
keeps vLLM's class name and keyword-only constructor (vLLM reads the signature); the plugin
registers nothing while $DEEPSPEC_VLLM_FINAL_STATE is unset; vLLM finds its entry point on
PYTHONPATH (the dist-info beside it) and the installed package ships those files. The plugin in the
real vLLM, on SmolLM2, is checked in tests/engine/test_vllm_features.py.
"""

from __future__ import annotations

import configparser
import fnmatch
import importlib.util
import inspect
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from data_tools.vllm_features import FINAL_STATE_ENV, PLUGIN_DIR

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def plugin():
    spec = importlib.util.spec_from_file_location("deepspec_vllm_final_state",
                                                  PLUGIN_DIR / "deepspec_vllm_final_state.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class StockModel(torch.nn.Module):
    """Stands in for a vLLM model class: aux states for the ids set, then its final (normed) state."""

    def __init__(self, *, vllm_config, prefix: str = ""):
        super().__init__()
        self.aux_layers: tuple[int, ...] = ()
        self.stage_output = None  # set: an intermediate pipeline stage's output (IntermediateTensors)

    def set_aux_hidden_state_layers(self, layers) -> None:
        self.aux_layers = tuple(layers)

    def forward(self, x):
        if self.stage_output is not None:
            return self.stage_output
        aux = [x + i for i in self.aux_layers]
        final = x * 10
        return (final, aux) if aux else final


def _config(num_layers: int):
    text = SimpleNamespace(num_hidden_layers=num_layers)
    return SimpleNamespace(model_config=SimpleNamespace(hf_config=SimpleNamespace(get_text_config=lambda: text)))


def test_final_state_is_appended_only_when_asked(plugin):
    cls = plugin.with_final_state(StockModel)
    assert cls.__name__ == "StockModel" and issubclass(cls, StockModel)
    assert inspect.signature(cls.__init__).parameters["vllm_config"].kind is inspect.Parameter.KEYWORD_ONLY
    x = torch.ones(3, 2)
    model = cls(vllm_config=_config(4))
    model.set_aux_hidden_state_layers([2, 5])  # 5 = L + 1
    assert model.aux_layers == (2,)  # the model never sees the extra id
    final, aux = model(x)
    assert len(aux) == 2 and torch.equal(aux[0], x + 2) and torch.equal(aux[1], final) and torch.equal(final, x * 10)
    model.set_aux_hidden_state_layers([5])  # only the final state: the model returns no aux list itself
    final, aux = model(x)
    assert len(aux) == 1 and torch.equal(aux[0], final)
    model.set_aux_hidden_state_layers([2, 4])  # not asked: the stock behaviour
    final, aux = model(x)
    assert [a.sum().item() for a in aux] == [18.0, 30.0]
    model.set_aux_hidden_state_layers([5])
    model.stage_output = SimpleNamespace(tensors={})  # an intermediate pipeline stage's output: untouched
    assert model(x) is model.stage_output


def test_register_does_nothing_without_the_variable(plugin, monkeypatch):
    monkeypatch.delenv(FINAL_STATE_ENV, raising=False)
    monkeypatch.setitem(sys.modules, "vllm", None)  # any import of vLLM would fail
    plugin.register()
    monkeypatch.setenv(FINAL_STATE_ENV, " DeepseekV4ForCausalLM, LlamaForCausalLM ,")
    assert plugin.requested_architectures() == ["DeepseekV4ForCausalLM", "LlamaForCausalLM"]
    assert plugin.final_state_id(43) == 44


def test_entry_point_is_found_on_pythonpath_and_shipped():
    (dist,) = PLUGIN_DIR.glob("*.dist-info")
    entry = configparser.ConfigParser()
    entry.read(dist / "entry_points.txt")
    assert entry["vllm.general_plugins"]["deepspec_final_state"] == "deepspec_vllm_final_state:register"
    assert (PLUGIN_DIR / "deepspec_vllm_final_state.py").exists()
    from importlib.metadata import entry_points

    sys.path.insert(0, str(PLUGIN_DIR))
    try:
        names = {e.name for e in entry_points(group="vllm.general_plugins")}
    finally:
        sys.path.remove(str(PLUGIN_DIR))
    assert "deepspec_final_state" in names
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    patterns = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]["data_tools"]
    for path in [*PLUGIN_DIR.glob("*.py"), *dist.iterdir()]:
        rel = path.relative_to(ROOT / "data_tools").as_posix()
        assert any(fnmatch.fnmatch(rel, p) for p in patterns), f"{rel} is not in the package data"
