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

from jaxmem import (
    checkpoint as checkpoint,
    data as data,
    ensemble as ensemble,
    likelihood as likelihood,
    linear as linear,
    membership as membership,
    mesh as mesh,
    models as models,
    pipeline as pipeline,
    report as report,
    scores as scores,
)
from jaxmem.checkpoint import (
    CheckpointDamagedError as CheckpointDamagedError,
    ConfigMismatchError as ConfigMismatchError,
    RunDirectoryBusyError as RunDirectoryBusyError,
    run_lock as run_lock,
)
from jaxmem.data import (
    Dataset as Dataset,
    DatasetNotPreparedError as DatasetNotPreparedError,
    load_dataset as load_dataset,
    nearest_neighbours as nearest_neighbours,
)
from jaxmem.ensemble import (
    Ensemble as Ensemble,
    EnsembleState as EnsembleState,
    FitResult as FitResult,
    TrainingDivergedError as TrainingDivergedError,
    fit as fit,
)
from jaxmem.likelihood import loglik_matrix as loglik_matrix, loglik_matrix_multihost as loglik_matrix_multihost
from jaxmem.linear import (
    Influence as Influence,
    LooDensityRatio as LooDensityRatio,
    influence as influence,
    leverage as leverage,
    leverage_streamed as leverage_streamed,
    loo_log_density_ratio_gaussian as loo_log_density_ratio_gaussian,
    loo_log_density_ratio_regression as loo_log_density_ratio_regression,
)
from jaxmem.membership import (
    Plan as Plan,
    balanced_subsets as balanced_subsets,
    kfold as kfold,
    load_plan as load_plan,
    random_subsets as random_subsets,
)
from jaxmem.mesh import (
    initialize_distributed as initialize_distributed,
    make_mesh as make_mesh,
    use_cpu_devices as use_cpu_devices,
)
from jaxmem.models import model_config as model_config
from jaxmem.pipeline import (
    MemorizationResult as MemorizationResult,
    load_result as load_result,
    memorization as memorization,
)
from jaxmem.report import summary as summary, write_report as write_report
from jaxmem.scores import (
    LabelMemorization as LabelMemorization,
    Scores as Scores,
    feldman_zhang as feldman_zhang,
    memorization_scores as memorization_scores,
    quantile_flags as quantile_flags,
)

#: ``jaxmem.make_ensemble(model_factory, tx, keep, batch_size=...)``: :func:`jaxmem.ensemble.make`,
#: an :class:`Ensemble` whose ``.init`` / ``.step`` / ``.epoch`` / ``.schedule`` / ``.evaluate``
#: are the optax-style pure functions.
make_ensemble = ensemble.make
#: ``jaxmem.create_model(name, example_shape, seed=...)``: see :func:`jaxmem.models.create`.
create_model = models.create

__version__ = "0.1.0"
