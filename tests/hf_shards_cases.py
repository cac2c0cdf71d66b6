"""What test_hf_shards.py and its rank worker share: the tiny model, its input and the LoRA settings."""
import torch
from transformers import LlamaConfig, LlamaForCausalLM

LORA = {"r": 2, "targets": ["q_proj", "down_proj"], "seed": 5}
IDS = torch.tensor([[3, 14, 15, 9, 26, 5, 35], [8, 9, 7, 9, 32, 38, 4]])


def save_model(folder):
    """A tiny Llama with odd sizes (uneven shards on two ranks), saved as a sharded safetensors checkpoint."""
    config = LlamaConfig(vocab_size=41, hidden_size=16, intermediate_size=33, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=32,
                         tie_word_embeddings=False)
    torch.manual_seed(7)
    model = LlamaForCausalLM(config)
    model.save_pretrained(folder, max_shard_size="8KB")
    return model.eval()
