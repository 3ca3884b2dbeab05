"""deepspec's vLLM plugin: the model's own final hidden state as one more extracted hidden state.

Loaded by vLLM, not by deepspec. vLLM's `extract_hidden_states` method stores the "aux" hidden states
a model returns for the layer ids in `eagle_aux_hidden_state_layer_ids`: the residual stream after
j decoder layers, j = 0..L. The final hidden state (after the final norm, where the target's next-token
distribution comes from) is not among them. For most decoders it is the final norm of aux state L and
deepspec applies that norm itself, but DeepSeek-V4 keeps 4 mHC residual streams: its aux states are
the mean of the streams, while its final state mixes the streams through `hc_head` before the norm, so
no aux state can be mapped to it.

This plugin gives any model the final state as aux id L + 1 (one past the last layer, an id vLLM never
uses): for each architecture named in $DEEPSPEC_VLLM_FINAL_STATE (comma-separated, e.g.
`DeepseekV4ForCausalLM`), it registers a subclass of vLLM's own class, under the same name, whose
`forward` appends the hidden state the model returns (its final, normed state) to the aux states when
id L + 1 was requested. Ids are sorted by vLLM, so the final state is always the last row. Nothing
else changes: the subclass is the stock model when L + 1 is not requested, and with the variable unset
the plugin registers nothing.

vLLM finds the plugin through the entry point in `deepspec_vllm_plugin-*.dist-info` beside this file
(group `vllm.general_plugins`), so having this folder on PYTHONPATH is enough; vLLM loads general
plugins in every process it starts (API server, engine core, workers), before any model is built.

Self-contained on purpose, like the connector: it imports only vLLM and torch.
"""

from __future__ import annotations

import importlib
import logging
import os

import torch

ENV = "DEEPSPEC_VLLM_FINAL_STATE"
LOGGER = "vllm.deepspec_final_state"  # under vLLM's logger: its handlers print it
_BUILT: dict[str, type] = {}


def requested_architectures() -> list[str]:
    return [a.strip() for a in os.environ.get(ENV, "").split(",") if a.strip()]


def final_state_id(num_hidden_layers: int) -> int:
    """The aux id that carries the final state: one past vLLM's last id (L, after the last layer)."""
    return int(num_hidden_layers) + 1


def _builtin(arch: str) -> tuple[str, str]:
    """(module, class) of vLLM's own class for ``arch``, from vLLM's built-in table (never from the live
    registry, where this plugin's own entry replaces it)."""
    from vllm.model_executor.models import registry

    entry = registry._VLLM_MODELS.get(arch)
    if entry is None:
        raise ValueError(f"{ENV} names {arch!r}, which is not one of vLLM's built-in architectures")
    return registry._resolve_module_name(entry[0]), entry[1]


def _base_class(arch: str) -> type:
    module, cls = _builtin(arch)
    return getattr(importlib.import_module(module), cls)


def with_final_state(base: type) -> type:
    """A subclass of the vLLM model class ``base`` that returns its final hidden state as aux id L + 1."""

    class FinalState(base):
        def __init__(self, *, vllm_config, prefix: str = "", **kwargs):
            # keyword-only `vllm_config` like vLLM's own classes: vLLM reads the signature to call it
            super().__init__(vllm_config=vllm_config, prefix=prefix, **kwargs)
            text_config = vllm_config.model_config.hf_config.get_text_config()
            self._deepspec_final_id = final_state_id(text_config.num_hidden_layers)
            self._deepspec_final = False
            logging.getLogger(LOGGER).info("deepspec plugin: %s gives its final hidden state as aux id %d "
                                           "when asked", base.__name__, self._deepspec_final_id)

        def set_aux_hidden_state_layers(self, layers) -> None:
            layers = tuple(int(i) for i in layers)
            self._deepspec_final = self._deepspec_final_id in layers
            # the model itself never sees the extra id: no layer loop can match it
            super().set_aux_hidden_state_layers(tuple(i for i in layers if i != self._deepspec_final_id))

        def forward(self, *args, **kwargs):
            out = super().forward(*args, **kwargs)
            if not self._deepspec_final or not isinstance(out, (tuple, torch.Tensor)):
                return out  # not asked for, or an intermediate pipeline stage (IntermediateTensors)
            if isinstance(out, tuple):
                hidden, aux = out
                return hidden, [*aux, hidden]
            return out, [out]

    FinalState.__name__ = FinalState.__qualname__ = base.__name__
    FinalState.__module__ = __name__
    return FinalState


def __getattr__(name: str) -> type:
    """`deepspec_vllm_final_state:<Arch>`, as registered: vLLM's class for <Arch> with the final state."""
    if name.startswith("__"):
        raise AttributeError(name)
    if name not in _BUILT:
        _BUILT[name] = with_final_state(_base_class(name))
    return _BUILT[name]


def register() -> None:
    """vLLM general plugin entry point: register the wrapped classes named in $DEEPSPEC_VLLM_FINAL_STATE."""
    archs = requested_architectures()
    if not archs:
        return
    from vllm import ModelRegistry

    for arch in archs:
        _builtin(arch)  # a clear error now for a name vLLM does not know; the model loads lazily
        ModelRegistry.register_model(arch, f"{__name__}:{arch}")
