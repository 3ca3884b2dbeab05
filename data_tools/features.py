"""Target features for training: the interface the trainer reads, and the three sources.

    source = open_feature_source(input_path, target, layer_ids, mode, split="train", ...)
    len(source); source.get_batch([3, 17]) -> [SequenceFeatures, ...]; source.identity

- ``cache``: a folder written by ``deepspec data features`` (``manifest.json``); chosen
  whenever ``input_path`` holds a manifest, whatever ``mode`` says. Checked against the
  target and layers when a target is given. Features come back float32 on the target's
  device (CPU without a target).
- ``online``: ``input_path`` is a regenerate output (conversations); ``get_batch``
  tokenizes nothing (done once at open), runs the resident target on the requested
  sequences in token-budgeted batches and returns its features (no disk).
- ``hybrid``: online during the first pass, and every computed sequence is written (in
  ``storage_dtype``) to shards in ``cache_dir``; later requests for it read the shard.
  Features are returned after the storage round trip in both cases, so every epoch sees
  the same values. ``cache_dir`` keeps its shards across runs (same fingerprint). A shard
  is written every ``shard_tokens`` computed tokens and when every sequence is covered;
  call ``source.flush()`` at the end of an epoch to write the rest.
- ``vllm``: as ``online`` (or ``hybrid`` when ``cache_dir`` is given), but vLLM servers at
  ``vllm_urls`` compute the features (data_tools/vllm_features.py); the resident target
  supplies the tokenizer, the identity and the final norm.

Splits: conversations carry the split of their prompt (train / heldout). ``split=
"heldout"`` returns the held-out sequences; when there are none, the last 5% (at least
one) of the train sequences in input order are held out instead, and ``split="train"``
leaves them out -- deterministic, so trainer and evaluator agree.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from data_tools.cache import (
    MANIFEST,
    EncodedSequence,
    FeatureCache,
    SequenceFeatures,
    bytes_per_token,
    check_dtype,
    deepspec_bytes_per_token,
    final_dtype,
    write_manifest,
    write_shard,
)
from data_tools.jsonl import atomic_write_text
from data_tools.tokenize import ChatSequence, load_sequences, template_hash
from deepspec.features import FeatureSource  # noqa: F401  (the interface these sources implement)
from deepspec.runs import run_started

STATE_FILE = "features_state.json"

__all__ = ["SequenceFeatures", "FeatureSource", "open_feature_source", "open_feature_splits", "extract_features",
           "OnlineSource", "HybridSource", "SplitView", "split_indices", "HELDOUT_FALLBACK"]

HELDOUT_FALLBACK = 0.05


def source_identity(target, layer_ids: Sequence[int], storage_dtype: str | None, max_seq_len: int) -> dict:
    return {**target.identity(), "layer_ids": [int(i) for i in layer_ids], "storage_dtype": storage_dtype,
            "final_dtype": final_dtype(storage_dtype) if storage_dtype else None,
            "max_seq_len": int(max_seq_len)}


def cache_identity(target, layer_ids: Sequence[int], storage_dtype: str, max_seq_len: int) -> dict:
    """The identity a feature cache records (and `deepspec train` checks): the source identity and
    the chat template's hash."""
    return {**source_identity(target, layer_ids, storage_dtype, max_seq_len),
            "chat_template_hash": template_hash(target.tokenizer.chat_template)}


def _older_final_rule(old_identity: dict, new_identity: dict) -> str:
    """A hint when a cache differs from this run only by being written before fp8 caches kept the final
    hidden state at 16 bits."""
    if old_identity.get("final_dtype") is None and new_identity.get("final_dtype") != new_identity.get(
            "storage_dtype") and {**old_identity, "final_dtype": new_identity["final_dtype"]} == new_identity:
        return (f" (it was written before fp8 caches kept the final hidden state at "
                f"{new_identity['final_dtype']}; it can still be read as a cache with features.source=cache)")
    return ""


def token_batches(lengths: Sequence[int], batch_tokens: int) -> list[list[int]]:
    """Positions grouped so that (rows x longest row) <= batch_tokens (at least one row each),
    longest first (sorted by length: little padding)."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    batches: list[list[int]] = []
    for i in order:
        if batches and (len(batches[-1]) + 1) * lengths[batches[-1][0]] <= batch_tokens:
            batches[-1].append(i)
        else:
            batches.append([i])
    return batches


@torch.no_grad()
def extract_features(target, layer_ids: Sequence[int], sequences: Sequence[ChatSequence],
                     batch_tokens: int = 8192) -> list[SequenceFeatures]:
    """Run the target on ``sequences`` (right-padded token-budgeted batches); features in the
    target's dtype on its device, in the order given."""
    out: list[SequenceFeatures | None] = [None] * len(sequences)
    device = target.device
    for batch in token_batches([len(s.input_ids) for s in sequences], batch_tokens):
        width = len(sequences[batch[0]].input_ids)
        ids_BT = torch.zeros((len(batch), width), dtype=torch.long)
        mask_BT = torch.zeros((len(batch), width), dtype=torch.long)
        for b, i in enumerate(batch):
            n = len(sequences[i].input_ids)
            ids_BT[b, :n] = torch.tensor(sequences[i].input_ids)
            mask_BT[b, :n] = 1
        res = target.forward(ids_BT.to(device), layer_ids, attention_mask_BT=mask_BT.to(device))
        for b, i in enumerate(batch):
            n = len(sequences[i].input_ids)
            out[i] = SequenceFeatures(ids_BT[b, :n].to(device),
                                      torch.tensor(sequences[i].loss_mask, dtype=torch.bool, device=device),
                                      res.taps_BTMD[b, :n].clone(), res.final_BTD[b, :n].clone())
    return out  # type: ignore[return-value]


def split_indices(splits: Sequence[str], split: str) -> list[int]:
    """Sequence positions of ``split`` (see the module docstring for the held-out fallback)."""
    if split not in ("train", "heldout", "all"):
        raise ValueError(f"split={split!r}; choose train, heldout or all")
    if split == "all":
        return list(range(len(splits)))
    heldout = [i for i, s in enumerate(splits) if s == "heldout"]
    train = [i for i, s in enumerate(splits) if s != "heldout"]
    if not heldout and len(train) > 1:
        k = max(1, math.floor(len(train) * HELDOUT_FALLBACK))
        train, heldout = train[:-k], train[-k:]
    return heldout if split == "heldout" else train


class SplitView:
    """A FeatureSource restricted to some sequence numbers of another one."""

    def __init__(self, source, indices: list[int]):
        self.source, self.indices, self.identity = source, indices, source.identity

    def __len__(self) -> int:
        return len(self.indices)

    def get_batch(self, indices: list[int]) -> list[SequenceFeatures]:
        return self.source.get_batch([self.indices[i] for i in indices])

    def supervised_tokens(self, indices: list[int]) -> list[torch.Tensor]:
        """Token ids under the loss mask of these sequences, without running the target."""
        return self.source.supervised_tokens([self.indices[i] for i in indices])

    def flush(self) -> None:
        """Hybrid: write what is computed but not yet in a shard (call at the end of an epoch)."""
        if hasattr(self.source, "flush"):
            self.source.flush()


class CacheSource:
    """A FeatureCache as a FeatureSource (features moved to ``device``)."""

    def __init__(self, cache: FeatureCache, device: torch.device | str = "cpu"):
        self.cache, self.device, self.identity = cache, device, cache.identity
        self.ids = cache.sequence_ids()
        self.splits = [cache.splits[i] for i in self.ids]

    def __len__(self) -> int:
        return len(self.ids)

    def get_batch(self, indices: list[int]) -> list[SequenceFeatures]:
        return [self.cache[self.ids[i]].to(self.device) for i in indices]

    def supervised_tokens(self, indices: list[int]) -> list[torch.Tensor]:
        return self.cache.supervised_tokens([self.ids[i] for i in indices])


class OnlineSource:
    """Features computed inside ``get_batch`` (no disk): by the resident target, or by ``extractor``
    (``extractor(sequences) -> [SequenceFeatures]``, e.g. a `VllmExtractor`) when given."""

    def __init__(self, sequences: list[ChatSequence], target, layer_ids: Sequence[int], max_seq_len: int,
                 batch_tokens: int = 8192, extractor: Callable | None = None):
        self.sequences, self.target, self.layer_ids = sequences, target, list(layer_ids)
        self.batch_tokens = batch_tokens
        self.extractor = extractor
        self.splits = [s.split for s in sequences]
        self.identity = source_identity(target, layer_ids, None, max_seq_len)

    def __len__(self) -> int:
        return len(self.sequences)

    def get_batch(self, indices: list[int]) -> list[SequenceFeatures]:
        seqs = [self.sequences[i] for i in indices]
        if self.extractor is not None:
            return self.extractor(seqs)
        return extract_features(self.target, self.layer_ids, seqs, self.batch_tokens)

    def supervised_tokens(self, indices: list[int]) -> list[torch.Tensor]:
        """Token ids under the loss mask, from the tokenized conversations (no target forward)."""
        return [torch.tensor(s.input_ids)[torch.tensor(s.loss_mask, dtype=torch.bool)]
                for s in (self.sequences[i] for i in indices)]


class HybridSource(OnlineSource):
    """Online on first use of a sequence, from ``cache_dir`` shards afterwards."""

    def __init__(self, sequences: list[ChatSequence], target, layer_ids: Sequence[int], max_seq_len: int,
                 cache_dir: str | Path, storage_dtype: str, input_digest: str, batch_tokens: int = 8192,
                 shard_tokens: int = 262144, extractor: Callable | None = None):
        super().__init__(sequences, target, layer_ids, max_seq_len, batch_tokens, extractor)
        self.dir = Path(cache_dir)
        self.dtype = check_dtype(storage_dtype)
        self.identity = source_identity(target, layer_ids, storage_dtype, max_seq_len)
        self.fingerprint = {"identity": self.identity, "input_sha256": input_digest}
        self.shard_tokens = shard_tokens
        self.shards: list[dict[str, Any]] = []
        self.cache: FeatureCache | None = None
        if (self.dir / MANIFEST).exists():
            cache = FeatureCache(self.dir, expect=self.identity)
            if cache.manifest["fingerprint"] != self.fingerprint:
                hint = _older_final_rule(cache.identity, self.identity)
                raise ValueError(f"hybrid cache_dir {self.dir} was written for other input or "
                                 f"settings{hint}; delete it or choose another features.cache_dir")
            self.cache, self.shards = cache, list(cache.shards)
        self._pending: dict[int, EncodedSequence] = {}  # computed, not yet in a shard

    def get_batch(self, indices: list[int]) -> list[SequenceFeatures]:
        missing = [i for i in dict.fromkeys(indices)
                   if i not in self._pending and (self.cache is None or i not in self.cache)]
        device = self.target.device
        fresh = {}
        if missing:
            for i, feats in zip(missing, super().get_batch(missing), strict=True):
                self._pending[i] = EncodedSequence.from_features(feats, self.dtype)
                fresh[i] = self._pending[i].decode(device)
            if sum(e.input_ids_T.numel() for e in self._pending.values()) >= self.shard_tokens \
                    or self._covered() == len(self):
                self.flush()
        return [fresh[i] if i in fresh else self._pending[i].decode(device) if i in self._pending
                else self.cache[i].to(device) for i in indices]

    def _covered(self) -> int:
        return len(self._pending) + (len(self.cache) if self.cache else 0)

    def flush(self) -> None:
        """Write pending sequences as one shard and update the manifest."""
        if not self._pending:
            return
        seqs = sorted(self._pending)
        path = self.dir / "shards" / f"shard-{len(self.shards):05d}.safetensors"
        self.shards.append(write_shard(path, seqs, [self.splits[i] for i in seqs],
                                       [self._pending[i] for i in seqs], self.dtype))
        write_manifest(self.dir, self.identity, self.fingerprint, self.shards,
                       complete=self._covered() == len(self))
        self.cache = FeatureCache(self.dir, verify="none")
        self._pending = {}


def open_feature_source(input_path: str | Path, target, layer_ids: Sequence[int], mode: str,
                        split: str = "train", max_seq_len: int = 2048, cache_dir: str | Path | None = None,
                        storage_dtype: str = "bf16", batch_tokens: int = 8192, shard_tokens: int = 262144,
                        verify: str = "lazy", vllm_urls: Sequence[str] = (), vllm_concurrency: int = 8,
                        vllm_final_state: str = "auto") -> FeatureSource:
    """The feature source the trainer reads (see the module docstring)."""
    (view,) = open_feature_splits(input_path, target, layer_ids, mode, (split,), max_seq_len, cache_dir,
                                  storage_dtype, batch_tokens, shard_tokens, verify, vllm_urls, vllm_concurrency,
                                  vllm_final_state)
    return view


def open_feature_splits(input_path: str | Path, target, layer_ids: Sequence[int], mode: str,
                        splits: Sequence[str] = ("train", "heldout"), max_seq_len: int = 2048,
                        cache_dir: str | Path | None = None, storage_dtype: str = "bf16",
                        batch_tokens: int = 8192, shard_tokens: int = 262144, verify: str = "lazy",
                        vllm_urls: Sequence[str] = (), vllm_concurrency: int = 8,
                        vllm_final_state: str = "auto") -> tuple[SplitView, ...]:
    """One view per split over a single source (a hybrid source's splits share its cache_dir shards)."""
    if mode not in ("cache", "online", "hybrid", "vllm"):
        raise ValueError(f"features.source={mode!r}; choose cache, online, hybrid or vllm")
    path = Path(input_path)
    if (path / MANIFEST).exists():
        expect = None
        if target is not None:
            expect = {**target.identity(), "layer_ids": [int(i) for i in layer_ids]}
        source = CacheSource(FeatureCache(path, expect=expect, verify=verify),
                             target.device if target is not None else "cpu")
    elif mode == "cache":
        raise FileNotFoundError(f"features.source=cache but {path} holds no {MANIFEST}: build the cache with "
                                f"`deepspec data features input={path} output_dir=...` and pass that folder")
    elif target is None:
        raise ValueError(f"features.source={mode} needs the resident target (got target=None)")
    else:
        sequences, _, digest = load_sequences(path, target.tokenizer, max_seq_len)
        extractor = None
        if mode == "vllm":
            from data_tools.vllm_features import VllmExtractor

            extractor = VllmExtractor(vllm_urls, target, target.check_layer_ids(layer_ids), vllm_concurrency,
                                      final_state=vllm_final_state)
        if mode == "online" or (mode == "vllm" and not cache_dir):
            source = OnlineSource(sequences, target, layer_ids, max_seq_len, batch_tokens, extractor)
        elif not cache_dir:
            raise ValueError("features.source=hybrid needs features.cache_dir=PATH (where first-pass features go)")
        else:
            source = HybridSource(sequences, target, layer_ids, max_seq_len, cache_dir, storage_dtype, digest,
                                  batch_tokens, shard_tokens, extractor)
    return tuple(SplitView(source, split_indices(source.splits, split)) for split in splits)


def plan_shards(lengths: Sequence[int], shard_tokens: int) -> list[list[int]]:
    """Consecutive sequence numbers per shard, each shard holding about ``shard_tokens`` tokens."""
    shards: list[list[int]] = [[]]
    tokens = 0
    for i, n in enumerate(lengths):
        if shards[-1] and tokens + n > shard_tokens:
            shards.append([])
            tokens = 0
        shards[-1].append(i)
        tokens += n
    return shards if shards[0] else []


def write_feature_cache(input_path: str | Path, target, layer_ids: Sequence[int], output_dir: str | Path,
                        storage_dtype: str = "bf16", max_seq_len: int = 2048, shard_tokens: int = 262144,
                        batch_tokens: int = 8192, progress: bool = True, extractor: Callable | None = None,
                        engine: str = "transformers") -> dict[str, Any]:
    """Build (or resume) the feature cache of ``input_path`` in ``output_dir``; returns the summary.

    Shard k always holds the same sequences (planned from token counts), so a restarted
    run keeps every shard recorded in ``features_state.json`` and recomputes the rest.
    ``extractor`` (``extractor(sequences) -> [SequenceFeatures]``) replaces the resident target's
    forward (``engine`` names it in the manifest); the cache is the same either way."""
    t0 = time.perf_counter()
    check_dtype(storage_dtype)
    layer_ids = target.check_layer_ids(layer_ids)
    out = Path(output_dir)
    sequences, dropped, digest = load_sequences(input_path, target.tokenizer, max_seq_len)
    if not sequences:
        raise ValueError(f"input={input_path}: no conversation with assistant tokens to extract "
                         f"(dropped: {dict(dropped)})")
    identity = cache_identity(target, layer_ids, storage_dtype, max_seq_len)
    fingerprint = {"identity": identity, "input_sha256": digest, "shard_tokens": shard_tokens}
    state_path = out / STATE_FILE
    state = {"fingerprint": fingerprint, "shards": {}}
    for path in (out / MANIFEST, state_path):
        if path.exists():
            old = json.loads(path.read_text())["fingerprint"]
            if old != fingerprint:
                diff = {k: (old.get(k), fingerprint[k]) for k in fingerprint if old.get(k) != fingerprint[k]}
                hint = _older_final_rule(old.get("identity") or {}, identity)
                raise ValueError(f"{out} holds a feature cache built with other input or settings (old, new): "
                                 f"{diff}{hint}; rerun with those settings to resume, or delete {out}")
    run_started()  # every check passed: the command's config is recorded
    if state_path.exists():
        state = json.loads(state_path.read_text())
    plan = plan_shards([len(s.input_ids) for s in sequences], shard_tokens)
    bar = tqdm(total=sum(len(s.input_ids) for s in sequences), desc="features", unit=" tok", unit_scale=True,
               disable=not progress)
    entries, resumed, computed_tokens, t_compute = [], 0, 0, 0.0
    for k, seq_ids in enumerate(plan):
        path = out / "shards" / f"shard-{k:05d}.safetensors"
        entry = state["shards"].get(str(k))
        if entry is None or not path.exists() or path.stat().st_size != entry["bytes"]:
            t1 = time.perf_counter()
            encoded = []
            for batch in _chunks(seq_ids, [len(sequences[i].input_ids) for i in seq_ids], 4 * batch_tokens):
                batch_seqs = [sequences[i] for i in batch]
                feats = extractor(batch_seqs) if extractor else extract_features(target, layer_ids, batch_seqs,
                                                                                 batch_tokens)
                encoded += [EncodedSequence.from_features(f, storage_dtype) for f in feats]
                bar.update(sum(len(sequences[i].input_ids) for i in batch))
            entry = write_shard(path, seq_ids, [sequences[i].split for i in seq_ids], encoded, storage_dtype)
            t_compute += time.perf_counter() - t1
            computed_tokens += sum(entry["num_tokens"])
            state["shards"][str(k)] = entry
            atomic_write_text(state_path, json.dumps(state) + "\n")
        else:
            resumed += 1
            bar.update(sum(entry["num_tokens"]))
        entries.append(entry)
    bar.close()
    m = len(layer_ids)
    manifest = write_manifest(out, identity, fingerprint, entries, complete=True,
                              extra={"bytes_per_token": bytes_per_token(m, target.hidden_size, storage_dtype),
                                     "dropped": dict(dropped), "engine": engine})
    shard_bytes = sum(e["bytes"] for e in entries)
    return {"sequences": manifest["sequences"], "tokens": manifest["tokens"],
            "loss_tokens": manifest["loss_tokens"], "splits": manifest["splits"], "dropped": dict(dropped),
            "shards": len(entries), "resumed_shards": resumed, "engine": engine, "storage_dtype": storage_dtype,
            "final_dtype": identity["final_dtype"],
            "layer_ids": layer_ids, "bytes_per_token": manifest["bytes_per_token"],
            "measured_bytes_per_token": round(shard_bytes / manifest["tokens"], 2),
            "deepspec_bf16_bytes_per_token": deepspec_bytes_per_token(m, target.hidden_size),
            "total_bytes": shard_bytes, "tokens_per_s": round(computed_tokens / t_compute, 1) if t_compute else None,
            "elapsed_s": round(time.perf_counter() - t0, 2), "output": str(out), "target": target.identity()}


def _chunks(ids: list[int], lengths: list[int], tokens: int) -> list[list[int]]:
    """``ids`` cut into consecutive runs of about ``tokens`` tokens."""
    runs: list[list[int]] = [[]]
    total = 0
    for i, n in zip(ids, lengths, strict=True):
        if runs[-1] and total + n > tokens:
            runs.append([])
            total = 0
        runs[-1].append(i)
        total += n
    return runs
