"""The tests' smallest realistic inputs: the demo's data with three authors (one of them to forget) and a 300-token
tokenizer trained on its texts."""
from geffect_kernels.data import demo_data, encode_pairs, qa_texts, train_tokenizer


def tiny_demo():
    """``(data, tokenizer)``: `demo_data` of three authors, one in the forget set, and its tokenizer."""
    data = demo_data(3, forget_fraction=0.34)
    return data, train_tokenizer(qa_texts(data.all_training), vocab_size=300)


def encoded_sets():
    """``(tokenizer, forget, retain)``: `tiny_demo`'s forget and retain pairs encoded as `EncodedSet`s."""
    data, tokenizer = tiny_demo()
    return tokenizer, encode_pairs(tokenizer, data.forget), encode_pairs(tokenizer, data.retain)
