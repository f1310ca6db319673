"""Conversion: a training model in, its deploy form out (`engine.reparameterize`).

The engine decides what converts what: a block with a recipe (`reparam_cli.blocks`, or the
caller's `recipes={...}`), else a block's own deploy method (`native.py`: timm, mmpretrain, ...),
then the graph pass (`graph.py`) folds every exactly-foldable linear region left, composing
`reparam_cli.core.algebra`. Library conventions come in through `reparam_cli.ecosystems`.
"""
