"""The draft's token tree: the likeliest paths under a budget, a valid tree in verification order."""

from ponder.spec.tree import DraftTree, chain_parents, tree_paths


def test_a_sure_draft_grows_a_chain_and_a_hesitant_one_branches():
    sure = DraftTree(budget=4, width=2)
    sure.offer(DraftTree.ROOT, [10, 11], [0.95, 0.04])
    assert sure.to_expand() == [0, 1]
    sure.offer(0, [20, 21], [0.9, 0.05])
    sure.offer(1, [30, 31], [0.5, 0.5])
    assert sure.to_expand() == [2, 3]                    # 0.855 and 0.0475 are among the best 3; 0.02 is not
    sure.offer(2, [40, 41], [0.9, 0.1])
    sure.offer(3, [50], [0.5])
    tokens, parents = sure.select()
    assert tokens == [10, 20, 40, 41] and parents == [-1, 0, 1, 1]   # 0.95, 0.855, 0.77, 0.086

    hesitant = DraftTree(budget=4, width=3)
    hesitant.offer(DraftTree.ROOT, [1, 2, 3], [0.4, 0.35, 0.2])
    hesitant.offer(0, [4, 5, 6], [0.6, 0.2, 0.1])
    tokens, parents = hesitant.select()
    assert tokens == [1, 2, 3, 4] and parents == [-1, -1, -1, 0]


def test_nodes_of_probability_zero_are_not_offered_and_ties_keep_parents_first():
    tree = DraftTree(budget=3, width=2)
    tree.offer(DraftTree.ROOT, [7, 8], [1.0, 0.0])
    tree.offer(0, [9], [1.0])
    tree.offer(2 - 1, [5], [1.0])
    tokens, parents = tree.select()
    assert tokens == [7, 9, 5] and parents == [-1, 0, 1]


def test_paths():
    assert tree_paths([-1, -1, 0, 2, 0]) == [[0], [1], [0, 2], [0, 2, 3], [0, 4]]
    assert tree_paths(chain_parents(3)) == [[0], [0, 1], [0, 1, 2]]
