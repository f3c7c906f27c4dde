"""The math of the published allocation rules, as pure functions.

Each module holds one rule's formulas, with the paper and the authors' code it follows; the
allocators that call them (sampling, rounds, metrics) live elsewhere:

- `history`: per-prompt statistics carried across visits (`PromptHistory`), for `gvm-history`,
  `knapsack` and `greso`.
- `knapsack`: Knapsack-RL's per-prompt value of n samples and its budget solver.
- `dapo`: DAPO's dynamic sampling (drop groups whose rewards are all equal, draw more).
- `reinforce_ada`: Reinforce-Ada's rounds, exit rules, balanced down-sampling and baseline.
- `greso`: GRESO's history-based skipping and the adaptation of its exploration base.
"""
