"""Vocabulary subsets of a SentencePiece model (the "tokenizer subsets" ablation axis).

Gemma's 256k vocabulary is a subset of a larger one. A subset keeps every piece
the round trip needs (specials, user-defined symbols, the 256 byte pieces and
every single character), then the best remaining pieces by score until the
target size. "Best by score" and not "first by id" matters for BPE: its
single-character pieces come last in id order, and its scores rank merges by
the order they were learned, so the kept merges always build on kept pieces.

Kept pieces stay in their original order, so the specials and bytes (which come
first) keep their ids and an embedding table is subset by gathering rows:
`new_table = old_table[kept_ids]`.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Any

import numpy as np
from sentencepiece import sentencepiece_model_pb2 as model_pb2

from core.tokenizer.spm import Tokenizer, TokenizerError, file_sha256
from core.tokenizer.train import write_atomic

_Piece = model_pb2.ModelProto.SentencePiece
_ALWAYS_KEPT_TYPES = (_Piece.CONTROL, _Piece.UNKNOWN, _Piece.USER_DEFINED, _Piece.BYTE)


@dataclasses.dataclass(frozen=True)
class Subset:
  """A written subset model and its id map.

  Attributes:
    tokenizer: the subset model, loaded.
    kept_ids: kept_ids[new_id] = id of the same piece in the base model.
    id_map_path: JSON file with the id map and the base model's hash.
  """

  tokenizer: Tokenizer
  kept_ids: tuple[int, ...]
  id_map_path: str


def id_map_path_for(model_path: str | os.PathLike) -> Path:
  return Path(str(model_path) + ".idmap.json")


def mandatory_ids(proto: Any) -> list[int]:
  """Ids of pieces every subset keeps: specials, user-defined, bytes, single characters."""
  return [
    i for i, p in enumerate(proto.pieces) if p.type in _ALWAYS_KEPT_TYPES or len(p.piece) == 1
  ]


def select_ids(proto: Any, size: int) -> list[int]:
  """The ids a subset of `size` pieces keeps, in base order."""
  must = set(mandatory_ids(proto))
  if size < len(must):
    raise TokenizerError(
      f"--size {size} is smaller than the {len(must)} pieces every subset keeps (specials, "
      f"bytes and single characters); use a size of at least {len(must)}"
    )
  if size > len(proto.pieces):
    raise TokenizerError(f"--size {size} is larger than the base vocabulary ({len(proto.pieces)})")
  others = [i for i in range(len(proto.pieces)) if i not in must]
  # Highest score first; ties (rare) keep the lower id, so the choice is stable.
  others.sort(key=lambda i: (-proto.pieces[i].score, i))
  return sorted(must | set(others[: size - len(must)]))


def subset_tokenizer(
  base_path: str | os.PathLike, size: int, out_path: str | os.PathLike
) -> Subset:
  """Writes a `size`-piece subset of the model at `base_path` to `out_path`.

  Also writes `<out_path>.idmap.json`: {"kept_ids": [...], "base": ..., "base_sha256": ...}.
  """
  base = Tokenizer(base_path)
  proto = model_pb2.ModelProto()
  proto.ParseFromString(Path(base.path).read_bytes())
  kept = select_ids(proto, size)
  pieces = [proto.pieces[i] for i in kept]
  new = model_pb2.ModelProto()
  new.CopyFrom(proto)
  del new.pieces[:]
  new.pieces.extend(pieces)
  new.trainer_spec.vocab_size = len(pieces)
  write_atomic(out_path, new.SerializeToString())
  map_path = id_map_path_for(out_path)
  write_atomic(
    map_path,
    json.dumps(
      {
        "base": base.path,
        "base_sha256": base.sha256,
        "size": len(kept),
        "subset_sha256": file_sha256(out_path),
        "kept_ids": kept,
      }
    ).encode(),
  )
  return Subset(tokenizer=Tokenizer(out_path), kept_ids=tuple(kept), id_map_path=str(map_path))


def load_id_map(path: str | os.PathLike) -> np.ndarray:
  """kept_ids from an id map file (or from the subset model path next to it)."""
  path = Path(path)
  if not path.name.endswith(".idmap.json"):
    path = id_map_path_for(path)
  if not path.is_file():
    raise TokenizerError(f"no id map at {path}; it is written by `ablax tokenizer subset`")
  return np.asarray(json.loads(path.read_text())["kept_ids"], dtype=np.int64)


def gather_embedding_rows(table: Any, kept_ids: Any) -> Any:
  """Rows of a base model's (vocab, dim) embedding table for the subset's ids."""
  kept_ids = np.asarray(kept_ids)
  if kept_ids.max(initial=-1) >= table.shape[0]:
    raise TokenizerError(
      f"the id map refers to id {int(kept_ids.max())} but the table has "
      f"{table.shape[0]} rows: it belongs to another base model"
    )
  return table[kept_ids]
