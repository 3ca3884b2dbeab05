"""On-disk target-feature cache: storage dtypes, atomic shards, manifest, checksums, reader.

Layout of a cache folder::

    manifest.json            identity, counts, one entry per shard (see below)
    shards/shard-00000.safetensors ...

A shard (safetensors) holds S sequences, N tokens in total, sequences back to back:

    seq_index  int64 [S]      the sequence numbers it holds (0..n-1 over the cache)
    offsets    int64 [S+1]    token offset of each sequence in the shard
    input_ids  int32 [N]
    loss_mask  uint8 [N]      1 = assistant token (supervised)
    taps       [N, M, D]      tapped layers, storage dtype
    final      [N, D]         final hidden state (post norm, pre LM head), final dtype
    taps_scale fp32 [N, M]    (fp8 only)

Storage dtypes: fp32, bf16, fp16, fp8 (e4m3, one fp32 scale per token per layer: x ≈
q * scale with scale = max|x| / 448 over the row's D values). The final hidden state is
kept at 16 bits or more whatever the taps use (``final_dtype``: bf16 when the taps are
fp8): it is where the target distribution p_t comes from, and fp8 rounding of it moves
p_t by a mean total variation of ~0.02 and flips its argmax at a few % of positions (an
order of magnitude more than bf16; benchmarks/protocol_ablation.py). Caches written
before this rule (fp8 ``final`` with a ``final_scale`` row, no ``final_dtype`` in the
identity) are still read. Bytes per token (``bytes_per_token``): 4 (id) + 1 (mask) +
M·D·b + D·b_final (+ M·4 for fp8 scales); the per-sequence seq_index/offsets (16 bytes a
sequence) are left out. DeepSpec's published layout costs 6 + 2·D·(M+1) in bf16.

The manifest lists, per shard: file, sha256, bytes, and per sequence its number, token
count and split, so the reader builds its index without touching a shard. Shards are
written to a temporary file and renamed; each is checked against its sha256 on open
(``verify="open"``), on the first read of that shard (``"lazy"``, the default) or never.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from deepspec.atomic import file_sha256  # noqa: F401  (re-exported)
from deepspec.features import SequenceFeatures, bytes_per_token, final_dtype  # noqa: F401  (re-exported)

FORMAT = "deepspec-features/1"
MANIFEST = "manifest.json"
STORAGE_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16,
                  "fp8": torch.float8_e4m3fn}
FP8_MAX = 448.0
SPLITS = ("train", "heldout")
IDENTITY_KEYS = ("name", "model_type", "num_layers", "hidden_size", "vocab_size", "stream_collapse",
                 "tokenizer_hash", "layer_ids", "weights")


def check_dtype(dtype: str) -> str:
    if dtype not in STORAGE_DTYPES:
        raise ValueError(f"features.dtype={dtype!r}; choose one of {sorted(STORAGE_DTYPES)}")
    return dtype


def encode(x: torch.Tensor, dtype: str) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Storage form of ``x`` [..., D]: (values, per-row fp32 scales [...] or None)."""
    check_dtype(dtype)
    if dtype != "fp8":
        return x.to(STORAGE_DTYPES[dtype]), None
    x = x.float()
    scale = (x.abs().amax(dim=-1) / FP8_MAX).clamp_min(1e-30)
    return (x / scale.unsqueeze(-1)).to(torch.float8_e4m3fn), scale


def decode(q: torch.Tensor, scale: torch.Tensor | None) -> torch.Tensor:
    """Float32 values from ``encode``'s output."""
    x = q.float()
    return x if scale is None else x * scale.float().unsqueeze(-1)


def deepspec_bytes_per_token(num_taps: int, hidden: int) -> int:
    """DeepSpec's published cache cost per token (bf16): 6 + 2·d·(m+1)."""
    return 6 + 2 * hidden * (num_taps + 1)


@dataclass
class EncodedSequence:
    """One sequence in storage form, on the CPU (encoding is per token, so encoding sequences
    one by one gives the same bytes as encoding a whole shard)."""

    input_ids_T: torch.Tensor
    loss_mask_T: torch.Tensor
    taps_TMD: torch.Tensor
    final_TD: torch.Tensor
    taps_scale_TM: torch.Tensor | None
    final_scale_T: torch.Tensor | None

    @classmethod
    def from_features(cls, f: SequenceFeatures, dtype: str) -> EncodedSequence:
        taps, taps_scale = encode(f.taps_TMD, dtype)
        final, final_scale = encode(f.final_TD, final_dtype(dtype))
        return cls(f.input_ids_T.cpu(), f.loss_mask_T.cpu(), taps.cpu(), final.cpu(),
                   None if taps_scale is None else taps_scale.cpu(),
                   None if final_scale is None else final_scale.cpu())

    def decode(self, device: torch.device | str = "cpu") -> SequenceFeatures:
        return SequenceFeatures(self.input_ids_T.to(device), self.loss_mask_T.to(device),
                                decode(self.taps_TMD, self.taps_scale_TM).to(device),
                                decode(self.final_TD, self.final_scale_T).to(device))


def write_shard(path: Path, seq_index: list[int], splits: list[str], seqs: list[EncodedSequence],
                dtype: str) -> dict[str, Any]:
    """Write one shard atomically; returns its manifest entry."""
    lengths = [int(s.input_ids_T.numel()) for s in seqs]
    offsets = torch.zeros(len(seqs) + 1, dtype=torch.int64)
    offsets[1:] = torch.cumsum(torch.tensor(lengths, dtype=torch.int64), 0)
    tensors = {"seq_index": torch.tensor(seq_index, dtype=torch.int64), "offsets": offsets,
               "input_ids": torch.cat([s.input_ids_T for s in seqs]).to(torch.int32),
               "loss_mask": torch.cat([s.loss_mask_T for s in seqs]).to(torch.uint8),
               "taps": torch.cat([s.taps_TMD for s in seqs]).contiguous(),
               "final": torch.cat([s.final_TD for s in seqs]).contiguous()}
    if dtype == "fp8":
        tensors["taps_scale"] = torch.cat([s.taps_scale_TM for s in seqs]).contiguous()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp.{os.getpid()}")
    save_file(tensors, str(tmp),
              metadata={"format": FORMAT, "dtype": dtype, "final_dtype": final_dtype(dtype)})
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)
    return {"file": str(path.relative_to(path.parent.parent)), "sha256": file_sha256(path),
            "bytes": path.stat().st_size, "seq_index": list(seq_index), "num_tokens": lengths,
            "loss_tokens": int(tensors["loss_mask"].sum()), "split": list(splits)}


def write_manifest(folder: Path, identity: dict[str, Any], fingerprint: dict[str, Any],
                   shards: list[dict[str, Any]], complete: bool, extra: dict[str, Any] | None = None) -> dict:
    manifest = {"format": FORMAT, "complete": complete, "identity": identity, "fingerprint": fingerprint,
                "sequences": sum(len(s["seq_index"]) for s in shards),
                "tokens": sum(sum(s["num_tokens"]) for s in shards),
                "loss_tokens": sum(s["loss_tokens"] for s in shards),
                "splits": {k: sum(s["split"].count(k) for s in shards) for k in SPLITS},
                **(extra or {}), "shards": shards}
    tmp = folder / f".{MANIFEST}.tmp.{os.getpid()}"
    tmp.write_text(json.dumps(manifest, indent=1) + "\n")
    os.replace(tmp, folder / MANIFEST)
    return manifest


def check_identity(where: str, have: dict[str, Any], want: dict[str, Any]) -> None:
    """Raise ValueError naming both sides when ``have`` (a cache) does not fit ``want`` (the run)."""
    from deepspec.guards import weights_mismatch

    diff = {k: (have.get(k), want[k]) for k in IDENTITY_KEYS if k in want and have.get(k) != want[k]}
    if set(diff) == {"weights"}:  # same target by name and shapes, other weights
        problem = weights_mismatch(f"feature cache at {where}", have, want)
        if problem:
            raise ValueError(problem)
        return
    if diff:
        raise ValueError(
            f"feature cache at {where} was built for target {have.get('name')} (tokenizer "
            f"{have.get('tokenizer_hash')}, layers {have.get('layer_ids')}); this run asks for target "
            f"{want.get('name')} (tokenizer {want.get('tokenizer_hash')}, layers {want.get('layer_ids')}); "
            f"differing (cache, run): {diff}. Rebuild it with `deepspec data features` for this target and "
            f"drafter, or point input= at a matching cache")


def shard_path(folder: Path, name: str) -> Path:
    """``folder / name`` for a manifest's shard entry, refused unless it stays inside ``folder``
    (a relative path without ``..``): a manifest cannot make the reader open other files."""
    rel = Path(name)
    if rel.is_absolute() or ".." in rel.parts or not rel.parts:
        raise ValueError(f"feature cache {folder}: {MANIFEST} names shard {name!r}, a path outside the cache "
                         f"folder; shard paths are relative to it (shards/shard-NNNNN.safetensors). The manifest "
                         f"was edited or not written by deepspec: rebuild the cache with `deepspec data features`")
    path = folder / rel
    if not path.resolve().is_relative_to(folder.resolve()):
        raise ValueError(f"feature cache {folder}: shard {name!r} resolves outside the cache folder (a symbolic "
                         f"link?); rebuild the cache with `deepspec data features`")
    return path


class FeatureCache:
    """Random access to a cache folder: ``cache[i]`` -> SequenceFeatures (float32, CPU).

    ``i`` is a sequence number (0..len-1 for a complete cache). ``expect``: identity the run
    needs (target identity + layer_ids); a mismatch raises ValueError. ``verify``: when
    shard checksums are checked ("open" | "lazy" | "none").
    """

    def __init__(self, path: str | Path, expect: dict[str, Any] | None = None, verify: str = "lazy"):
        self.path = Path(path)
        if verify not in ("open", "lazy", "none"):
            raise ValueError(f"verify={verify!r}; choose open, lazy or none")
        manifest_path = self.path / MANIFEST
        if not manifest_path.exists():
            raise FileNotFoundError(f"{self.path} is not a feature cache (no {MANIFEST}): "
                                    f"build one with `deepspec data features`")
        self.manifest = json.loads(manifest_path.read_text())
        if self.manifest.get("format") != FORMAT:
            raise ValueError(f"{manifest_path}: format {self.manifest.get('format')!r}, expected {FORMAT!r}")
        self.identity: dict[str, Any] = self.manifest["identity"]
        if expect:
            check_identity(str(self.path), self.identity, expect)
        self.dtype: str = self.identity["storage_dtype"]
        # caches written before fp8 kept the final hidden state at 16 bits stored it in the taps' dtype
        self.final_dtype: str = self.identity.get("final_dtype") or self.dtype
        self.shards: list[dict[str, Any]] = self.manifest["shards"]
        for shard in self.shards:
            shard_path(self.path, shard["file"])
        self._where: dict[int, tuple[int, int, int]] = {}  # seq -> (shard, token start, token end)
        self.splits: dict[int, str] = {}
        for k, shard in enumerate(self.shards):
            start = 0
            for seq, n, split in zip(shard["seq_index"], shard["num_tokens"], shard["split"], strict=True):
                self._where[int(seq)] = (k, start, start + n)
                self.splits[int(seq)] = split
                start += n
        self._verified = [verify == "none"] * len(self.shards)
        if verify == "open":
            for k in range(len(self.shards)):
                self._verify(k)

    def __len__(self) -> int:
        return len(self._where)

    def __contains__(self, i: int) -> bool:
        return i in self._where

    def sequence_ids(self) -> list[int]:
        return sorted(self._where)

    def _verify(self, k: int) -> None:
        if self._verified[k]:
            return
        shard = self.shards[k]
        file = shard_path(self.path, shard["file"])
        if not file.exists():
            raise FileNotFoundError(f"feature cache {self.path}: shard {file} is missing; rebuild the cache")
        got = file_sha256(file)
        if got != shard["sha256"]:
            raise ValueError(f"feature cache {self.path}: shard {file} is corrupted (sha256 {got[:16]}..., "
                             f"manifest says {shard['sha256'][:16]}...); delete it and rerun "
                             f"`deepspec data features` with the same settings to rewrite it")
        self._verified[k] = True

    def __getitem__(self, i: int) -> SequenceFeatures:
        if i not in self._where:
            raise IndexError(f"sequence {i} is not in feature cache {self.path} ({len(self)} sequences)")
        k, a, b = self._where[i]
        self._verify(k)
        with safe_open(str(shard_path(self.path, self.shards[k]["file"])), framework="pt") as f:
            names = set(f.keys())

            def part(name: str) -> torch.Tensor:
                return f.get_slice(name)[a:b]

            taps = decode(part("taps"), part("taps_scale") if "taps_scale" in names else None)
            final = decode(part("final"), part("final_scale") if "final_scale" in names else None)
            return SequenceFeatures(part("input_ids").long(), part("loss_mask").bool(), taps, final)

    def get_batch(self, indices: list[int]) -> list[SequenceFeatures]:
        return [self[i] for i in indices]

    def supervised_tokens(self, indices: list[int]) -> list[torch.Tensor]:
        """Token ids under the loss mask of sequences ``indices`` (long), read from each shard's id and
        mask columns only: no feature is decoded, no target runs."""
        missing = [i for i in indices if i not in self._where]
        if missing:
            raise IndexError(f"sequences {missing[:5]} are not in feature cache {self.path} "
                             f"({len(self)} sequences)")
        by_shard: dict[int, list[int]] = {}
        for i in indices:
            by_shard.setdefault(self._where[i][0], []).append(i)
        out: dict[int, torch.Tensor] = {}
        for k, seqs in by_shard.items():
            self._verify(k)
            with safe_open(str(self.path / self.shards[k]["file"]), framework="pt") as f:
                ids, mask = f.get_tensor("input_ids"), f.get_tensor("loss_mask").bool()
            for i in seqs:
                _, a, b = self._where[i]
                out[i] = ids[a:b][mask[a:b]].long()
        return [out[i] for i in indices]
