"""Export: drafters (and targets) in the layouts serving engines load, and back.

- `drafter.py`   export_drafter / load_exported: format vllm | sglang | hf, re-import with identical logits
- `layouts.py`   deepspec <-> engine tensor names and config.json fields (vLLM 0.32 source lines cited)
- `conventions.py` each engine's layer-id convention (docs/export.md, the off-by-one trap)
- `checks.py`    the key check: refuse an export the engine would refuse or misread, naming the keys
- `target.py`    a GGUF / local target written as an HF directory engines load
- `v4.py`        the DeepSeek-V4 `mtp.*` layout
- `engine_check.py`, `vllm_side.py`  the real-vLLM check (scripts/engine_check.sh, tests/engine/)
- `run.py`       `deepspec export`
"""
