"""The default recipe's settings, in a module light enough for the command line to import at start-up
(:mod:`geoir.training.recipes` pulls in torch); :class:`geoir.training.recipes.Recipe` and ``geoir train``
both take them from here."""

from __future__ import annotations

#: Training methods (``geoir train --method``).
METHODS = ("srl", "dgssh", "plain", "combined")
#: Code lengths of the hash methods (``--bits``).
BITS = (16, 32, 48, 64, 128)
#: The shipped model's method and code length.
METHOD = "combined"
CODE_BITS = 64
#: Backbone principal axes kept beside the SRL embedding (``--retain-dim``; 0: off).
RETAIN_DIM = 256
#: Weight of the similarity-distillation term of SRL training (``--distill``; 0: off).
DISTILL = 10.0
#: Let validation weigh the hash head's continuous code into the float embedding (``--fuse-codes``).
FUSE_CODES = False
#: Which heads train again on every training item once validation has chosen their epoch (``--refit``):
#: none, the hash head (``codes``), the float embedding (``float``) or both (``all``).
REFITS = ("none", "codes", "float", "all")
#: The shipped model re-trains its hash head; its float embedding keeps the head validation chose, which
#: finds the same place at another date more often (docs/results.md).
REFIT = "codes"
