"""Concept explanations: what the model saw, not only where. Concept banks (`extract`: CRAFT and
ACE, CRAFT's recursive `split`), where each concept sits in an image (`concept_maps`), how much each
matters (`importance`: Sobol total-order indices beside gradient x coefficient and TCAV;
`removal_effect`), whether a ranking of concepts is faithful (`ranking_fidelity`), TCAV with its
significance test (`tcav`), relevance maximisation for CRP (`relevance_max`; CRP itself is the
method "crp"), the `Concept(bank, k)` target that every method explains, counterfactual visual
explanations (`counterfactual`, also `sk.counterfactual`), feature visualisation (`visualize`:
class model visualisation, MACO), post-hoc prototypes (`prototypes`), concept metrics against
known parts (`score_bank`) and class summaries (`summarize_class`). This room may import the core,
methods, metrics, tasks and datasets. See docs/concepts.md."""
from . import ace  # noqa: F401  (registers the ACE extractor)
from .bank import ConceptBank, ConceptMaps, concept_maps, extract  # noqa: F401
from .counterfactual import Counterfactual, counterfactual  # noqa: F401
from .fidelity import RankingFidelity, ranking_fidelity, ranking_from  # noqa: F401
from .importance import ConceptImportance, importance  # noqa: F401
from .metrics import ConceptScores, random_bank, removal_effect, score_bank  # noqa: F401
from .relevance import RelevanceMax, relevance_max  # noqa: F401
from .summaries import ClassSummary, summarize_class  # noqa: F401
from .target import Concept, ConceptSubject  # noqa: F401
from .prototypes import Prototypes, prototypes  # noqa: F401
from .visualize import Visualization, visualize  # noqa: F401
from .tcav import TCAVResult, bank_tcav, tcav  # noqa: F401

__all__ = ["ace", "ConceptBank", "ConceptMaps", "concept_maps", "extract", "Counterfactual", "counterfactual", "RankingFidelity", "ranking_fidelity", "ranking_from", "ConceptImportance", "importance", "ConceptScores", "random_bank", "removal_effect", "score_bank", "RelevanceMax", "relevance_max", "ClassSummary", "summarize_class", "Concept", "ConceptSubject", "Prototypes", "prototypes", "Visualization", "visualize", "TCAVResult", "bank_tcav", "tcav"]
