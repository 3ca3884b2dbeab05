"""deepspec's hidden-state connector for vLLM: loaded by vLLM, not by deepspec.

vLLM's `extract_hidden_states` speculative method keeps the hidden states of the layers named in
`eagle_aux_hidden_state_layer_ids` in a cache-only layer; a KV connector writes them to a file when
a request finishes and returns the path in the response's `kv_transfer_params["hidden_states_path"]`.
vLLM's own `ExampleHiddenStatesConnector` copies them through pinned memory and CUDA events, which
fails on a CPU (`pin_memory=True requires a CUDA or other accelerator backend`). This subclass keeps
everything else (paths, lock files, block handling) and writes synchronously on the host:

- the rows are gathered from the cache-only layer, moved to the CPU and written with `safetensors`
  to `<file>.tmp` then renamed, so a reader never sees half a file;
- the file's metadata records `vllm_layer_ids` (the aux ids in the order of the rows' second axis:
  vLLM sorts and de-duplicates them) so a reader can check it talks to a server that extracts the
  layers it needs;
- the request's `<file>.lock` (held exclusively since the request was scheduled) is released after
  the rename: readers take a shared `flock` on it before opening the file.

Usage (this folder on vLLM's PYTHONPATH; deepspec's `data_tools/vllm_features.py` builds the command):

    PYTHONPATH=data_tools/vllm_plugin python -m vllm.entrypoints.openai.api_server --model DIR \\
      --speculative-config '{"method": "extract_hidden_states", "num_speculative_tokens": 1,
                             "draft_model_config": {"hf_config": {"eagle_aux_hidden_state_layer_ids": [..]}}}' \\
      --kv-transfer-config '{"kv_connector": "DeepspecHiddenStatesConnector", "kv_role": "kv_producer",
                             "kv_connector_module_path": "deepspec_vllm_connector",
                             "kv_connector_extra_config": {"shared_storage_path": "/shared/hs"}}'

Self-contained on purpose: it imports only what vLLM's own environment has (torch, safetensors,
vllm), never deepspec, whose dependencies vLLM's pinned torch/transformers do not share.
"""

from __future__ import annotations

import fcntl
import json
import os

import torch
from safetensors.torch import save_file
from vllm.distributed.kv_transfer.kv_connector.v1.example_hidden_states_connector import (
    ExampleHiddenStatesConnector,
    PendingSave,
    extract_from_kv_cache,
)


class _Written:
    """Stands in for the CUDA event the parent class polls: the write is already done."""

    @staticmethod
    def query() -> bool:
        return True


class DeepspecHiddenStatesConnector(ExampleHiddenStatesConnector):
    """`ExampleHiddenStatesConnector` with a synchronous host write (works on CPU and GPU)."""

    def _aux_layer_ids(self) -> list[int]:
        hf_config = self._vllm_config.speculative_config.draft_model_config.hf_config
        return sorted(set(int(i) for i in getattr(hf_config, "eagle_aux_hidden_state_layer_ids", [])))

    def _submit_async_write(self, pending: PendingSave) -> None:
        if not self._is_tp_rank_zero:
            return
        assert self._kv_cache is not None
        blocks = torch.tensor(pending.block_ids, dtype=torch.long)
        offsets = torch.arange(self._block_size, dtype=torch.long)
        slots = (blocks.reshape(-1, 1) * self._block_size + offsets.reshape(1, -1)).flatten()
        num_tokens = int(pending.token_ids.shape[0])
        hidden = extract_from_kv_cache(self._kv_cache, slots.to(self._kv_cache.device), num_tokens)
        tensors = {"hidden_states": hidden.to("cpu").contiguous(),
                   "token_ids": pending.token_ids.clone().to(torch.int64)}
        os.makedirs(os.path.dirname(pending.filename) or ".", exist_ok=True)
        lock_fd = self._lock_fds.pop(pending.req_id, None)
        if lock_fd is None and self.use_lock:
            lock_fd = os.open(pending.filename + ".lock", os.O_CREAT | os.O_WRONLY | os.O_TRUNC, 0o644)
            fcntl.flock(lock_fd, fcntl.LOCK_EX)
        try:
            tmp = f"{pending.filename}.tmp"
            save_file(tensors, tmp, metadata={"vllm_layer_ids": json.dumps(self._aux_layer_ids())})
            os.replace(tmp, pending.filename)
        finally:
            if lock_fd is not None:
                os.close(lock_fd)  # releases LOCK_EX: readers waiting on LOCK_SH go on
        self._req_copy_events[pending.req_id] = _Written()
