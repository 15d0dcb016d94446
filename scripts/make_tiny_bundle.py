"""Make a tiny PBS2P bundle (random 2-layer LLaMA, BPE tokenizer trained here, fast compression) for
`make test-arm`: small enough to load and decode quickly under qemu. Needs the compress extras (torch).

    .venv/bin/python scripts/make_tiny_bundle.py OUT_DIR
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

WORDS = "the model of a small language runs on the edge with binary weights and sparse masks".split()


def main(out: str) -> None:
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    from pbs2p_edge.checkpoint import read_tokenizer_files, save_checkpoint
    from pbs2p_edge.compress.pipeline import compress
    from pbs2p_edge.config import PBS2PConfig
    from pbs2p_edge.export.bundle import export_bundle

    with tempfile.TemporaryDirectory(prefix="tiny-bundle-") as tmp:
        folder = Path(tmp)
        tokenizer = Tokenizer(models.BPE())
        tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tokenizer.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=384,
            special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            show_progress=False,
        )
        text = " ".join(WORDS[(i * 7) % len(WORDS)] for i in range(5000))
        tokenizer.train_from_iterator([text], trainer=trainer)
        fast = PreTrainedTokenizerFast(
            tokenizer_object=tokenizer, eos_token="<|im_end|>", unk_token="<|endoftext|>"
        )
        fast.save_pretrained(folder)
        torch.manual_seed(0)
        config = LlamaConfig(
            vocab_size=len(fast),
            hidden_size=128,
            intermediate_size=320,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=256,
            tie_word_embeddings=True,
            eos_token_id=fast.eos_token_id,
        )
        model = LlamaForCausalLM(config).eval()
        calib = torch.randint(0, config.vocab_size, (4, 32), generator=torch.Generator().manual_seed(0))
        settings = PBS2PConfig(calib_samples=4, calib_len=32, arb_iters=3, cfs=False)
        compressed = compress(
            model, settings, calib, tokenizer_files=read_tokenizer_files(folder), progress=False
        )
        save_checkpoint(compressed, folder / "model.pt")
        export_bundle(folder / "model.pt", out, weights="pbs2p", force=True, validate=False)
    print(f"tiny PBS2P bundle in {out}")


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit(__doc__)
    main(sys.argv[1])
