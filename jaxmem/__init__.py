"""jaxmem: how much does a model memorize each of its training examples?

The memorization score of van den Burg & Williams (NeurIPS 2021) is the leave-one-out
density ratio ``M_i = log p(x_i | D) - log p(x_i | D without x_i)`` in nats, estimated
with an ensemble of models trained on subsets of D (a membership plan). The stages, each
a module with a small functional API (DESIGN.md §2)::

    data -> membership plan -> ensemble training -> log-likelihood matrix -> scores -> report
                                                                   (+ linear baseline)

Everything public is re-exported here; the modules stay importable on their own
(``jaxmem.membership``, ``jaxmem.ensemble``, ``jaxmem.likelihood``, ``jaxmem.scores``,
``jaxmem.linear``, ``jaxmem.models``, ``jaxmem.data``, ``jaxmem.report``, ``jaxmem.mesh``).
"""

from jaxmem import checkpoint as checkpoint
from jaxmem import data as data
from jaxmem import ensemble as ensemble
from jaxmem import likelihood as likelihood
from jaxmem import linear as linear
from jaxmem import membership as membership
from jaxmem import mesh as mesh
from jaxmem import models as models
from jaxmem import pipeline as pipeline
from jaxmem import report as report
from jaxmem import scores as scores
from jaxmem.checkpoint import ConfigMismatchError as ConfigMismatchError
from jaxmem.data import Dataset as Dataset
from jaxmem.data import DatasetNotPreparedError as DatasetNotPreparedError
from jaxmem.data import load_dataset as load_dataset
from jaxmem.data import nearest_neighbours as nearest_neighbours
from jaxmem.ensemble import Ensemble as Ensemble
from jaxmem.ensemble import EnsembleState as EnsembleState
from jaxmem.ensemble import FitResult as FitResult
from jaxmem.ensemble import fit as fit
from jaxmem.likelihood import loglik_matrix as loglik_matrix
from jaxmem.likelihood import loglik_matrix_multihost as loglik_matrix_multihost
from jaxmem.linear import Influence as Influence
from jaxmem.linear import LooDensityRatio as LooDensityRatio
from jaxmem.linear import influence as influence
from jaxmem.linear import leverage as leverage
from jaxmem.linear import leverage_streamed as leverage_streamed
from jaxmem.linear import loo_log_density_ratio_gaussian as loo_log_density_ratio_gaussian
from jaxmem.linear import loo_log_density_ratio_regression as loo_log_density_ratio_regression
from jaxmem.membership import Plan as Plan
from jaxmem.membership import balanced_subsets as balanced_subsets
from jaxmem.membership import kfold as kfold
from jaxmem.membership import load_plan as load_plan
from jaxmem.membership import random_subsets as random_subsets
from jaxmem.mesh import initialize_distributed as initialize_distributed
from jaxmem.mesh import make_mesh as make_mesh
from jaxmem.pipeline import MemorizationResult as MemorizationResult
from jaxmem.pipeline import load_result as load_result

from jaxmem.models import model_config as model_config
from jaxmem.pipeline import memorization as memorization
from jaxmem.report import summary as summary
from jaxmem.report import write_report as write_report
from jaxmem.scores import LabelMemorization as LabelMemorization
from jaxmem.scores import Scores as Scores
from jaxmem.scores import feldman_zhang as feldman_zhang
from jaxmem.scores import memorization_scores as memorization_scores
from jaxmem.scores import quantile_flags as quantile_flags

#: ``jaxmem.make_ensemble(model_factory, tx, keep, batch_size=...)``: the optax-style
#: ``init`` / ``step`` / ``epoch`` functions of :func:`jaxmem.ensemble.make`.
make_ensemble = ensemble.make
#: ``jaxmem.create_model(name, example_shape, seed=...)``: see :func:`jaxmem.models.create`.
create_model = models.create

__version__ = "0.1.0"
