"""jaxmem: how much does a model memorize each of its training examples?

The memorization score of van den Burg & Williams (NeurIPS 2021) is the leave-one-out
density ratio ``M_i = log p(x_i | D) - log p(x_i | D without x_i)`` in nats, estimated
with an ensemble of models trained on subsets of D. The public API is re-exported here.
"""

from jaxmem import mesh as mesh
from jaxmem.mesh import make_mesh as make_mesh

__version__ = "0.1.0"
