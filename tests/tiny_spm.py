"""A small SentencePiece model trained in the test on a made-up corpus (nothing downloads)."""

from pathlib import Path

import numpy as np

WORDS = (
  "the model attention layer window norm token embedding gradient sample query key value "
  "head rotary position scale softcap residual block vocabulary paper table figure result "
  "ablation global local tied untied a reads tokens and predicts next one while layers mix "
  "with feed forward blocks under of context every published lists parameters heads sizes "
  "learning rates warmup steps batch clipping weight decay"
).split()


def train_spm(directory: Path, vocab_size: int = 300) -> Path:
  """Trains a BPE model on 400 random sentences of WORDS; returns directory/spm.model."""
  import sentencepiece as spm  # pylint: disable=g-import-not-at-top

  rng = np.random.default_rng(0)
  lines = [
    " ".join(rng.choice(WORDS, size=int(rng.integers(4, 12)))) + f" {i}." for i in range(400)
  ]
  corpus = directory / "corpus.txt"
  corpus.write_text("\n".join(lines) + "\n")
  spm.SentencePieceTrainer.Train(
    input=str(corpus),
    model_prefix=str(directory / "spm"),
    vocab_size=vocab_size,
    model_type="bpe",
    minloglevel=2,
    num_threads=1,
  )
  return directory / "spm.model"
