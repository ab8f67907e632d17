"""The small randomly initialised Hugging Face CLIP shared by the CLIP tests (no CLIP weights
exist offline): 32x32 input, patch 8 (4x4 grid + CLS), 2 vision and 2 text blocks of width 32 with
2 heads, 16-d embeddings, and a deterministic character tokenizer."""
import torch

EOS, VOCAB, LENGTH = 99, 100, 16
PROMPTS = ["a photo of a cat", "a photo of a dog", "a red car"]


def char_tokenizer(prompts):
    """Deterministic toy tokenizer: characters -> ids 1..98, then EOS, padded with 0."""
    ids = torch.zeros(len(prompts), LENGTH, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, p in enumerate(prompts):
        toks = [1 + (ord(c) % 97) for c in p[:LENGTH - 1]] + [EOS]
        ids[i, :len(toks)] = torch.tensor(toks)
        mask[i, :len(toks)] = 1
    return {"input_ids": ids, "attention_mask": mask}


def make_tiny_clip():
    from transformers import CLIPConfig, CLIPModel

    from saliencykit.tasks.clip import CLIPSubject

    torch.manual_seed(0)
    cfg = CLIPConfig(text_config=dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                      num_attention_heads=2, max_position_embeddings=LENGTH, eos_token_id=EOS,
                                      bos_token_id=98, pad_token_id=0),
                     vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                                        image_size=32, patch_size=8), projection_dim=16)
    return CLIPSubject(CLIPModel(cfg).eval(), char_tokenizer, input_size=32, name="tiny-clip")
