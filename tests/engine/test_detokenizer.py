"""Incremental detokenization and stop conditions, token by token through a byte-level tokenizer."""

from ponder import SamplingParams
from ponder.engine.detokenizer import init_detokenizer, process_token
from ponder.engine.sequence import Request, Sequence
from ponder.model.tokenizer import Tokenizer


def _feed(tokenizer, text, params, prompt="Q:"):
    prompt_ids = tokenizer.encode(prompt)
    seq = Sequence(Request("r", prompt, prompt_ids, params), list(prompt_ids), len(prompt_ids), 0, seed=0)
    init_detokenizer(seq)
    seen = []
    for token in tokenizer.encode(text):
        process_token(seq, token, tokenizer, eos_token_ids=[258], max_model_len=10_000)
        seen.append(seq.text)
        if seq.finish_reason:
            break
    return seq, seen


def test_split_utf8_characters_come_out_whole(byte_tokenizer_dir):
    tok = Tokenizer(byte_tokenizer_dir)
    text = "café — 日本 🙂!"
    assert len(tok.encode(text)) > len(text)          # multi-byte characters span several tokens
    seq, seen = _feed(tok, text, SamplingParams(max_tokens=100))
    assert seq.text == text
    assert all("\ufffd" not in s for s in seen)


def test_stop_string_across_tokens_is_excluded(byte_tokenizer_dir):
    tok = Tokenizer(byte_tokenizer_dir)
    seq, _ = _feed(tok, "hello world, goodbye", SamplingParams(max_tokens=100, stop=["o wor", "xyz"]))
    assert seq.text == "hell" and seq.finish_reason == "stop" and seq.stop_reason == "o wor"
    seq, _ = _feed(tok, "hello world", SamplingParams(max_tokens=100, stop="o w", include_stop_str_in_output=True))
    assert seq.text == "hello w"


def test_max_tokens_and_eos(byte_tokenizer_dir):
    tok = Tokenizer(byte_tokenizer_dir)
    seq, _ = _feed(tok, "abcdefgh", SamplingParams(max_tokens=3))
    assert seq.text == "abc" and seq.finish_reason == "length"
    seq, _ = _feed(tok, "ab<|im_end|>cd", SamplingParams(max_tokens=30))
    assert seq.text == "ab" and seq.finish_reason == "stop" and seq.stop_reason == 258
    seq, _ = _feed(tok, "ab<|im_end|>cd", SamplingParams(max_tokens=30, ignore_eos=True))
    assert seq.text == "abcd"
    seq, _ = _feed(tok, "abcd", SamplingParams(max_tokens=30, stop_token_ids=[ord("c")]))
    assert seq.text == "ab" and seq.stop_reason == ord("c")
