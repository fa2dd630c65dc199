"""Fine-grained perturbation unlearning (docs/design.md §7, our formulation): score the parameters on
the forget set, select the top K (or K at random), perturb the selection in one fused pass, then
repair on the retained data. Methods compose the selection ops (unlearn_ext/selection.py) and
never touch raw pointers."""
from .adaptive import K_LADDER, AdaptiveRandomKUnlearner, AdaptiveTopKUnlearner
from .scores import SCORES, forget_scores
from .unlearner import PERTURBATIONS, PerturbUnlearner, RandomKUnlearner, TopKUnlearner

__all__ = ["SCORES", "forget_scores", "PERTURBATIONS", "PerturbUnlearner", "TopKUnlearner", "RandomKUnlearner",
           "K_LADDER", "AdaptiveTopKUnlearner", "AdaptiveRandomKUnlearner"]
