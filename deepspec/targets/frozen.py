"""FrozenTarget: the one interface data tools, training and eval use to talk to a target.

Convention (docs/algorithms.md): "layer k" is the output of decoder layer k (`hidden_states[k+1]` in
`transformers`); the final layer is never tapped because its `hidden_states` entry is
post-norm. The final hidden state returned here is post final norm, pre LM head, so
`target.logits(final)` is the target's distribution. DeepSeek-V4 keeps 4 mHC residual
streams ([B, S, 4, D]); taps are collapsed to [B, S, D] by `stream_collapse`.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any, Optional, Sequence

import torch
from torch import nn

from deepspec.targets.shapes import TargetShapes, check_taps, shapes_from_hf_config

COLLAPSE_RULES = ("mean", "sum", "first", "last")


@dataclass
class TargetOutput:
    taps_BTMD: torch.Tensor  # tapped layers' outputs, in the order of `layer_ids`
    final_BTD: torch.Tensor  # post final norm, pre LM head
    past_key_values: Any = None


def collapse_streams(hidden: torch.Tensor, rule: str) -> torch.Tensor:
    """[B, S, n_streams, D] -> [B, S, D] (identity for ordinary [B, S, D] hidden states)."""
    if hidden.dim() == 3:
        return hidden
    if rule == "mean":
        return hidden.mean(dim=2)
    if rule == "sum":
        return hidden.sum(dim=2)
    if rule == "first":
        return hidden[:, :, 0]
    if rule == "last":
        return hidden[:, :, -1]
    raise ValueError(f"target.stream_collapse={rule!r}; choose one of {COLLAPSE_RULES}")


class FrozenTarget:
    """A frozen causal LM with tapped-feature forward, frozen embedding and LM head."""

    def __init__(self, model: nn.Module, tokenizer=None, name: str = "target", stream_collapse: str = "mean",
                 chat_template: Optional[str] = None):
        if stream_collapse not in COLLAPSE_RULES:
            raise ValueError(f"target.stream_collapse={stream_collapse!r}; choose one of {COLLAPSE_RULES}")
        self.model = model.eval()
        for p in self.model.parameters():
            p.requires_grad_(False)
        self.tokenizer = tokenizer
        if tokenizer is not None and chat_template:
            tokenizer.chat_template = chat_template
        self.name = name
        self.stream_collapse = stream_collapse
        self.source: Optional[str] = None  # where it was loaded from (recorded beside the weights fingerprint)
        self._weights_fp: Optional[str] = None
        self.shapes: TargetShapes = shapes_from_hf_config(model.config)
        self._layers = self._find_layers(model)

    # -- geometry ---------------------------------------------------------------------------
    @property
    def num_layers(self) -> int:
        return self.shapes.num_layers

    @property
    def hidden_size(self) -> int:
        return self.shapes.hidden_size

    @property
    def vocab_size(self) -> int:
        return self.shapes.vocab_size

    @property
    def device(self) -> torch.device:
        return self.embed_tokens.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.embed_tokens.weight.dtype

    @property
    def embed_tokens(self) -> nn.Embedding:
        return self.model.get_input_embeddings()

    @property
    def lm_head_weight(self) -> torch.Tensor:
        """[V, D] frozen LM head (the embedding itself when tied, never copied)."""
        return self.model.get_output_embeddings().weight

    @property
    def eos_token_ids(self) -> list[int]:
        ids = getattr(self.model.generation_config, "eos_token_id", None) or self.model.config.eos_token_id
        ids = ids if isinstance(ids, list) else [ids] if ids is not None else []
        if self.tokenizer is not None and self.tokenizer.eos_token_id is not None:
            ids = ids + [self.tokenizer.eos_token_id]
        return sorted(set(int(i) for i in ids))

    @staticmethod
    def _find_layers(model: nn.Module) -> nn.ModuleList:
        decoder = model.get_decoder() if hasattr(model, "get_decoder") else getattr(model, "model", model)
        layers = getattr(decoder, "layers", None)
        if layers is None:
            raise ValueError(f"cannot find decoder layers in {type(model).__name__}: expected `model.layers`")
        return layers

    def check_layer_ids(self, layer_ids: Sequence[int]) -> list[int]:
        """Validate taps: inside the model and never the final (post-norm) layer (`check_taps`)."""
        return check_taps(self.shapes, layer_ids, self.name)

    # -- identity ---------------------------------------------------------------------------
    def tokenizer_hash(self) -> str:
        """Hash of the vocabulary and chat template: caches and checkpoints record it."""
        if self.tokenizer is None:
            return "none"
        h = hashlib.sha256()
        vocab = self.tokenizer.get_vocab()
        for tok in sorted(vocab, key=vocab.get):
            h.update(tok.encode("utf-8", "surrogatepass"))
            h.update(b"\0")
        h.update((self.tokenizer.chat_template or "").encode())
        return h.hexdigest()[:16]

    def identity(self) -> dict:
        return {"name": self.name, "model_type": self.shapes.model_type, "num_layers": self.num_layers,
                "hidden_size": self.hidden_size, "vocab_size": self.vocab_size,
                "stream_collapse": self.stream_collapse, "tokenizer_hash": self.tokenizer_hash(),
                "weights": self.weights_fingerprint()}

    def weights_fingerprint(self) -> str:
        """Content identity of the frozen weights (computed once): see deepspec.guards."""
        if self._weights_fp is None:
            from deepspec.guards import weights_fingerprint

            self._weights_fp = weights_fingerprint(self.model)
        return self._weights_fp

    # -- chat -------------------------------------------------------------------------------
    @property
    def chat_template(self) -> str:
        if self.tokenizer is None:
            raise ValueError(f"target {self.name} has no tokenizer: set target.tokenizer to a source that has one")
        template = self.tokenizer.chat_template
        if not template:
            raise ValueError(f"target {self.name}'s tokenizer has no chat template: set target.chat_template "
                             f"to a Jinja template")
        return template

    def render_chat(self, messages: list[dict], add_generation_prompt: bool = False,
                    enable_thinking: Optional[bool] = None) -> str:
        _ = self.chat_template  # clear error when missing
        kwargs = {} if enable_thinking is None else {"enable_thinking": enable_thinking}
        return self.tokenizer.apply_chat_template(messages, tokenize=False,
                                                  add_generation_prompt=add_generation_prompt, **kwargs)

    # -- forward ----------------------------------------------------------------------------
    @torch.no_grad()
    def forward(self, input_ids_BT: torch.Tensor, layer_ids: Sequence[int],
                attention_mask_BT: Optional[torch.Tensor] = None, position_ids_BT: Optional[torch.Tensor] = None,
                past_key_values: Any = None, use_cache: bool = False) -> TargetOutput:
        """Run the target; return the tapped layers' outputs and the final hidden state."""
        ids = self.check_layer_ids(layer_ids)
        captured: dict[int, torch.Tensor] = {}

        def hook_for(k: int):
            def hook(_module, _args, output):
                captured[k] = output[0] if isinstance(output, (tuple, list)) else output
            return hook

        handles = [self._layers[k].register_forward_hook(hook_for(k)) for k in sorted(set(ids))]
        try:
            out = self.model.get_decoder()(input_ids=input_ids_BT, attention_mask=attention_mask_BT,
                                   position_ids=position_ids_BT, past_key_values=past_key_values,
                                   use_cache=use_cache)
        finally:
            for h in handles:
                h.remove()
        taps = torch.stack([collapse_streams(captured[k], self.stream_collapse) for k in ids], dim=2)
        return TargetOutput(taps_BTMD=taps, final_BTD=out.last_hidden_state,
                            past_key_values=out.past_key_values if use_cache else None)

    def logits(self, final_BTD: torch.Tensor) -> torch.Tensor:
        """Target logits from final hidden states through the frozen LM head."""
        return self.model.get_output_embeddings()(final_BTD)
