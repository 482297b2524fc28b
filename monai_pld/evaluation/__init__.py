"""Cross-architecture evaluation: train classifiers from scratch on an image set, test them on the real test split.

Every row of a comparison is an image set (:mod:`~monai_pld.evaluation.sources`): a distilled ``images.npz``, a
``distribution.pt`` rendered through its generator (``mean``, one fixed ``sample``, or ``resample``: fresh samples
every epoch), a shared package, or the ``random`` / ``full`` real-image baselines. Training uses MONAI's
``SupervisedTrainer`` (per-sample DSA, SGD with momentum) and testing MONAI's ``SupervisedEvaluator``
(:mod:`~monai_pld.evaluation.training`); metrics come from scikit-learn (:mod:`~monai_pld.evaluation.metrics`);
:func:`evaluate_image_set` runs it all and writes the report (:mod:`~monai_pld.evaluation.report`).
"""

from .metrics import classification_metrics, summarise
from .run import evaluate_image_set
from .sources import EVAL_MODES, ImageSource, default_evaluation_dir, load_image_source
from .training import PROTOCOLS, train_and_test, train_classifier

__all__ = [
    "EVAL_MODES",
    "PROTOCOLS",
    "ImageSource",
    "classification_metrics",
    "default_evaluation_dir",
    "evaluate_image_set",
    "load_image_source",
    "summarise",
    "train_and_test",
    "train_classifier",
]
