"""Beyond single experts: exact joint removals, pairwise interactions and Shapley values of the active set.

arXiv 2606.10703 removes one expert at a time (its first stated limitation) while pruning removes sets.
This package measures, with the same exact intervention engine, how the experts of a token's active set
combine: the cost of removing every pair together (:data:`moeaudit.tables.INTERACTION_COLUMNS`), each
expert's exact Shapley value in the game of removing subsets of the active set
(:data:`~moeaudit.tables.SHAPLEY_COLUMNS`), and the joint cost of the sets a pruning criterion drops
(:data:`~moeaudit.tables.INTERACTION_SET_COLUMNS`). The game and its formulas: :mod:`.games`.

Examples
--------
>>> from moeaudit.interactions import measure_interactions, interaction_summary  # doctest: +SKIP
>>> result = measure_interactions(moe, input_ids, n=200)  # doctest: +SKIP
>>> interaction_summary(result.pairs, result.shapley)  # doctest: +SKIP
"""

from moeaudit.interactions.games import exact_shapley, permutation_shapley
from moeaudit.interactions.measure import InteractionsResult, InteractionsStats, measure_interactions
from moeaudit.interactions.stage import run_interactions
from moeaudit.interactions.summary import interaction_matrix, interaction_summary, set_summary, shapley_tests

__all__ = ["InteractionsResult", "InteractionsStats", "exact_shapley", "interaction_matrix", "interaction_summary",
           "measure_interactions", "permutation_shapley", "run_interactions", "set_summary", "shapley_tests"]
