"""The draft's token tree: the likeliest paths under a budget, a valid tree in verification order."""

from ponder.spec.tree import AcceptanceCalibration, DraftTree, chain_parents, tree_paths


def test_a_sure_draft_grows_a_chain_and_a_hesitant_one_branches():
    sure = DraftTree(budget=4, width=2)
    sure.offer(DraftTree.ROOT, [10, 11], [0.95, 0.04])
    assert sure.to_expand() == [0, 1]
    sure.offer(0, [20, 21], [0.9, 0.05])
    sure.offer(1, [30, 31], [0.5, 0.5])
    assert sure.to_expand() == [2, 3]                    # 0.855 and 0.0475 are among the best 3; 0.02 is not
    sure.offer(2, [40, 41], [0.9, 0.1])
    sure.offer(3, [50], [0.5])
    tokens, parents, odds = sure.select()
    assert odds == [(0, 0.95), (0, 0.9), (0, 0.9), (1, 0.1)]
    assert tokens == [10, 20, 40, 41] and parents == [-1, 0, 1, 1]   # 0.95, 0.855, 0.77, 0.086

    hesitant = DraftTree(budget=4, width=3)
    hesitant.offer(DraftTree.ROOT, [1, 2, 3], [0.4, 0.35, 0.2])
    hesitant.offer(0, [4, 5, 6], [0.6, 0.2, 0.1])
    tokens, parents, _ = hesitant.select()
    assert tokens == [1, 2, 3, 4] and parents == [-1, -1, -1, 0]


def test_a_sibling_passed_over_grows_once_it_is_the_likeliest_node_left():
    tree = DraftTree(budget=4, width=1)
    tree.offer(DraftTree.ROOT, [1, 2], [0.6, 0.4])
    assert tree.to_expand() == [0]
    tree.offer(0, [3, 4], [0.5, 0.1])                    # worth 0.3 and 0.06
    assert tree.to_expand() == [1]      # the root's second choice (0.4), older than the newest depth's best (0.3)
    tree.offer(1, [5], [0.9])                            # 0.36
    assert tree.to_expand() == [4]
    tokens, parents, _ = tree.select()
    assert tokens == [1, 2, 3, 5] and parents == [-1, -1, 0, 1]
    assert tree.to_expand() == []                        # the best budget - 1 are all expanded


def test_nodes_of_probability_zero_are_not_offered_and_ties_keep_parents_first():
    tree = DraftTree(budget=3, width=2)
    tree.offer(DraftTree.ROOT, [7, 8], [1.0, 0.0])
    tree.offer(0, [9], [1.0])
    tree.offer(2 - 1, [5], [1.0])
    tokens, parents, _ = tree.select()
    assert tokens == [7, 9, 5] and parents == [-1, 0, 1]


def test_paths():
    assert tree_paths([-1, -1, 0, 2, 0]) == [[0], [1], [0, 2], [0, 2, 3], [0, 4]]
    assert tree_paths(chain_parents(3)) == [[0], [0, 1], [0, 1, 2]]


def test_calibration_starts_at_the_drafts_belief_and_learns_the_targets_rate():
    calibration = AcceptanceCalibration(prior=8.0)
    assert calibration.estimate(0, 0.97) == 0.97 and calibration.estimate(1, 0.02) == 0.02
    for i in range(100):       # an overconfident draft: its sure first choice is right 70% of the time,
        calibration.observe(0, 0.97, i % 10 < 7)           # its unlikely second choice 25%
        calibration.observe(1, 0.02, i % 4 == 0)
    assert abs(calibration.estimate(0, 0.97) - 0.72) < 0.02
    assert abs(calibration.estimate(1, 0.02) - 0.23) < 0.02
    assert calibration.estimate(0, 0.4) == 0.4                          # another bin: not yet seen


def test_a_calibrated_tree_branches_where_the_draft_is_overconfident():
    calibration = AcceptanceCalibration(prior=1.0)
    for i in range(100):
        calibration.observe(0, 0.97, i % 10 < 6)
        calibration.observe(1, 0.02, i % 10 < 3)

    def grow(tree):
        tree.offer(DraftTree.ROOT, [1, 2], [0.97, 0.02])
        tree.to_expand()
        tree.offer(0, [3, 4], [0.97, 0.02])
        tree.offer(1, [5, 6], [0.97, 0.02])
        tree.to_expand()
        tree.offer(2, [7, 8], [0.97, 0.02])
        return tree.select()[:2]
    assert grow(DraftTree(budget=3, width=2)) == ([1, 3, 7], [-1, 0, 1])        # raw: a chain
    # calibrated: depth 3 is worth 0.6^3 = 0.22, the root's second choice 0.3
    assert grow(DraftTree(budget=3, width=2, calibration=calibration)) == ([1, 2, 3], [-1, -1, 0])


def test_a_verification_teaches_each_node_whose_parent_was_accepted():
    calibration = AcceptanceCalibration(prior=1.0)
    # root -> 0 (token 5) -> 2 (token 7); root -> 1 (token 6) -> 3 (token 8)
    odds, parents, tokens = [(0, 0.9), (1, 0.05), (0, 0.9), (0, 0.9)], [-1, -1, 0, 1], [5, 6, 7, 8]
    calibration.observe_verified(odds, parents, tokens, path=[0], drawn=[5, 9])   # 5 accepted, then 9 drawn
    assert calibration.estimate(0, 0.9) == (1 + 0.9) / (2 + 1)        # node 0 taken, node 2 not
    assert calibration.estimate(1, 0.05) == (0 + 0.05) / (1 + 1)      # node 1 seen, not taken
    assert sum(map(sum, calibration.offered)) == 3                               # node 3: its parent was not
