"""The FedTreeLoRA algorithm on adapter tensors: distances, one tree, layer-wise cuts, expert averaging;
and how well sharing partitions recover planted client groups.

Arrays in, arrays out (numpy, scipy and scikit-learn; the expert averages also take torch tensors, so
a server can average on a GPU): no model, no transport, no I/O.
"""

from fedtreelora.core.distances import layer_distances
from fedtreelora.core.experts import Experts, aggregate_experts, group_means, group_means_for
from fedtreelora.core.plan import SharingPlan, mean_silhouette, plan_sharing
from fedtreelora.core.structure import ari_by_layer, planted_levels
from fedtreelora.core.tau_auto import RelabellingTest, batch_mean_silhouette
from fedtreelora.core.tree import build_tree, cut_exact

__all__ = [
    "Experts",
    "RelabellingTest",
    "SharingPlan",
    "aggregate_experts",
    "ari_by_layer",
    "batch_mean_silhouette",
    "build_tree",
    "cut_exact",
    "group_means",
    "group_means_for",
    "layer_distances",
    "mean_silhouette",
    "plan_sharing",
    "planted_levels",
]
