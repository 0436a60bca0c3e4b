"""Token trees through the runner: each tree token's logits are bitwise those of decoding its
path one token at a time, whatever its siblings, on both KV cache types."""

import pytest
import torch

from ponder.model.runner import TokenTree


@pytest.mark.parametrize("kv_cache_dtype", ["fp16", "fp32"])
def test_a_tree_token_computes_what_decoding_its_path_computes(make_tiny_engine, kv_cache_dtype):
    runner = make_tiny_engine(weights="q8_0", kv_cache_dtype=kv_cache_dtype).runner
    prompt = [3, 14, 15, 92, 65, 35, 89, 79, 32, 38]
    a, b, c, x, y = 46, 26, 43, 99, 7

    decoded_table = list(range(0, 8))
    runner.execute([(prompt[:-1], 0, decoded_table)], [])
    decoded = []
    for pos, token in enumerate([prompt[-1], a, b, c], start=len(prompt) - 1):
        decoded.append(runner.execute([([token], pos, decoded_table)], [0])[0])

    # the root, a sibling x of a, a, a child y of a, b under a, c under b: stored in this order
    tree_table = list(range(20, 28))
    runner.execute([(prompt[:-1], 0, tree_table)], [])
    root = len(prompt) - 1
    paths = [[root], [root, root + 1], [root, root + 2], [root, root + 2, root + 3], [root, root + 2, root + 4],
             [root, root + 2, root + 4, root + 5]]
    tokens = [prompt[-1], x, a, y, b, c]
    other = ([5, 6, 7], 0, list(range(40, 42)))      # an unrelated prefill chunk in the same step
    logits = runner.execute([(tokens, root, tree_table, TokenTree(root, paths)), other], [1], [(0, 0, len(tokens))])
    tree = logits[1:]
    for want, got in zip(decoded, [tree[0], tree[2], tree[4], tree[5]]):
        assert torch.equal(want, got)
    assert not torch.equal(tree[1], decoded[1])        # x is another token at a's position


def test_move_tokens_copies_every_layer(make_tiny_engine):
    runner = make_tiny_engine(weights="q8_0").runner
    runner.execute([([1, 2, 3, 4, 5, 6], 0, [3, 4])], [])
    before = runner.kv_cache[:, :, 4, 1].clone()
    runner.move_tokens([3, 4], [(5, 2), (4, 3)])       # table positions: block 4 offset 1 -> block 3 offset 2
    assert torch.equal(runner.kv_cache[:, :, 3, 2], before)
